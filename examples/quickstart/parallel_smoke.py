"""Smoke run of what mm has today: configuration, the CPU/GPU accelerator layer, process groups,
and megatron-core's tensor-parallel layers, pipeline schedule, DDP and distributed optimizer,
training a toy residual MLP (no video yet) on random tensors until its loss falls.

    torchrun --nproc_per_node 4 examples/quickstart/parallel_smoke.py --mm-model ... (see run.sh)
"""

from __future__ import annotations

import time

import torch
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig

from mm.accelerator import destroy_distributed, rank0_print
from mm.runtime import start

SEQ = 16


class ToyStage(torch.nn.Module):
    """This pipeline stage's residual MLP blocks: column-parallel up, row-parallel down."""

    def __init__(self, config: TransformerConfig, num_layers: int, first: bool):
        super().__init__()
        h = config.hidden_size
        self.ups = torch.nn.ModuleList(ColumnParallelLinear(h, 4 * h, config=config, init_method=config.init_method,
                                                            bias=True, gather_output=False) for _ in range(num_layers))
        self.downs = torch.nn.ModuleList(RowParallelLinear(4 * h, h, config=config, init_method=config.init_method,
                                                           bias=True, input_is_parallel=True, skip_bias_add=False)
                                         for _ in range(num_layers))
        self.config, self.first, self.input_tensor = config, first, None
        self.model_type = ModelType.encoder_or_decoder
        # what megatron-core's finalize_model_grads asks of a pipeline stage
        self.pre_process, self.post_process = first, mpu.is_pipeline_last_stage()
        self.share_embeddings_and_output_weights = False

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, x):
        h = x if self.first else self.input_tensor
        for up, down in zip(self.ups, self.downs):
            hidden, _ = up(h)
            out, _ = down(torch.nn.functional.gelu(hidden))
            h = h + out
        return h


def main() -> None:
    runtime = start(prog="parallel_smoke.py")
    args, model_cfg = runtime.config.args, runtime.config.model
    hidden = model_cfg.predictor.params["hidden_size"]
    stage = mpu.get_pipeline_model_parallel_rank()
    layers = (model_cfg.predictor.pipeline_num_layers or [model_cfg.predictor.num_layers])[stage]
    config = TransformerConfig(num_layers=model_cfg.predictor.num_layers, hidden_size=hidden,
                               num_attention_heads=model_cfg.predictor.num_heads,
                               tensor_model_parallel_size=args.tensor_model_parallel_size,
                               pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                               sequence_parallel=args.sequence_parallel, pipeline_dtype=torch.float32,
                               use_cpu_initialization=True, gradient_accumulation_fusion=False)
    module = ToyStage(config, layers, first=mpu.is_pipeline_first_stage()).to(runtime.accelerator.device())
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=args.use_distributed_optimizer, grad_reduce_in_fp32=True), module)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer), [model])
    config.finalize_model_grads_func = finalize_model_grads

    dp = mpu.get_data_parallel_world_size()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    num_micro = gbs // (args.micro_batch_size * dp)
    device = runtime.accelerator.device()
    # a fixed target map, the same on every rank; each DP rank draws its own inputs
    target = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)) / hidden**0.5
    data_gen = torch.Generator().manual_seed(args.seed + mpu.get_data_parallel_rank())

    def batches():
        while True:
            x = torch.randn(SEQ, args.micro_batch_size, hidden, generator=data_gen)
            yield x.to(device), torch.tanh(x @ target).to(device)

    data = batches()
    tokens = SEQ * gbs
    losses = []
    for iteration in range(1, args.train_iters + 1):
        start_time = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()

        def forward_step(_, chunk):
            x, y = next(data)  # every stage draws the same micro-batch sequence
            out = chunk(x)
            return out, lambda o: (((o - y) ** 2).mean(), {"loss": ((o - y) ** 2).mean().detach().clone()})

        step_losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=None, model=model, num_microbatches=num_micro,
            seq_length=SEQ, micro_batch_size=args.micro_batch_size, forward_only=False)
        _, grad_norm, _ = optimizer.step()
        elapsed = time.perf_counter() - start_time
        if mpu.is_pipeline_last_stage():
            loss = torch.stack([entry["loss"] for entry in step_losses]).mean()
            torch.distributed.all_reduce(loss, group=mpu.get_data_parallel_group())
            losses.append(loss.item() / dp)
        if iteration % args.log_interval == 0 and mpu.is_pipeline_last_stage() and mpu.get_data_parallel_rank() == 0 \
                and mpu.get_tensor_model_parallel_rank() == 0:
            print(f" iteration {iteration:>4}/{args.train_iters} | loss {losses[-1]:.5f} | grad norm {grad_norm:.4f} "
                  f"| elapsed time per iteration (ms): {elapsed * 1000:.1f} | tokens/s: {tokens / elapsed:.0f}",
                  flush=True)
    if mpu.is_pipeline_last_stage() and mpu.get_data_parallel_rank() == 0 and mpu.get_tensor_model_parallel_rank() == 0:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        verdict = "fell" if last < 0.5 * first else "did NOT fall enough"
        print(f"parallel smoke: loss {first:.4f} -> {last:.4f} ({verdict})", flush=True)
        if last >= 0.5 * first:
            raise SystemExit(1)
    rank0_print("parallel smoke: done. Video training and sampling to .mp4 are not in mm yet "
                "(issues 4-10); this smoke exercises the foundation only.")
    destroy_distributed()


if __name__ == "__main__":
    main()
