"""LoRA training of the Wan DiT under TP2 + SP, CP2 and PP2 (gloo, 2 CPU processes) against one process:
megatron-core's DDP, optimizer and pipeline schedule around the adapted model as the training loop
builds them (``mm.training.pretrain``), float64 weights. Only the adapters train: every base tensor is
the same after the steps, and neither DDP nor the optimizer holds anything for the frozen weights. An
adapter checkpoint written at TP2 loads at TP1."""

from __future__ import annotations

import dataclasses
import multiprocessing
from types import SimpleNamespace

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.markers import marked_extended
from tests.wan_helpers import diffusers_model, inputs, tiny_kwargs

LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "proj_q", "proj_k", "proj_v", "proj_out",
        "ffn.0", "ffn.2"]
LAYOUTS = {
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "cp2_ring": ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"],
    "cp2_ulysses": ["--context-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}
# CP under Ulysses moves attention heads, not linears: cp2_ring covers the adapters' gradients over CP
EXTENDED = {"cp2_ulysses"}
STEPS = 3


def _setup(flags, world):
    """The adapted DiT of this rank (float64), wrapped for training, with the run's args."""
    from megatron.core import parallel_state as mpu

    from mm.accelerator import get_accelerator
    from mm.arguments import parse_flags
    from mm.arguments.validation import parallel_sizes, virtual_pipeline_size
    from mm.families import family_for
    from mm.models.predictor.lora import add_adapters
    from mm.models.predictor.transformer_config import transformer_config
    from mm.models.predictor.wan import WanDiTConfig
    from mm.parallel import initialize_parallel
    from mm.training.pretrain import build_model_chunks

    args = parse_flags([*flags, *LORA, "--mm-model", "unused.json", "--lr", "2e-2", "--seed", "3",
                        "--clip-grad", "0"])  # megatron's clipping takes fp32 gradients alone
    initialize_parallel(parallel_sizes(args, None, world), seed=args.seed, cp_algo=args.context_parallel_algo)
    family = family_for("wan_dit")
    kwargs = tiny_kwargs(layers=2)
    arch = WanDiTConfig(**kwargs)
    config = dataclasses.replace(transformer_config(args, arch, True, virtual_pipeline_size(args)),
                                 params_dtype=torch.float64, pipeline_dtype=torch.float64)
    pred = SimpleNamespace(model_id="wan_dit", pipeline_num_layers=[1, 1] if args.pipeline_model_parallel_size > 1
                           else None)
    chunks = build_model_chunks(family, pred, arch, config, None)
    source = {k: v.double() for k, v in diffusers_model(kwargs).state_dict().items()}
    settings = family.lora_settings(args)
    for chunk in chunks:
        family.load_weights(chunk, source, args.tensor_model_parallel_size, mpu.get_tensor_model_parallel_rank())
        add_adapters(chunk, settings, args.seed, family.lora_part_counts())
    return args, config, chunks, kwargs, get_accelerator(), settings


def _train_worker(rank, world, flags):
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mm.ckpt import unwrap
    from mm.models.predictor.lora import is_adapter_key
    from mm.parallel import destroy_parallel
    from mm.training import pretrain

    # gradient buffers in the weights' float64 (the loop's are fp32, for bf16/fp32 weights)
    fp32_buffers = pretrain.ddp_config_for
    pretrain.ddp_config_for = lambda a: dataclasses.replace(fp32_buffers(a), grad_reduce_in_fp32=False)
    args, config, chunks, kwargs, acc, _ = _setup(flags, world)
    before = {k: v.clone() for c in chunks for k, v in c.state_dict().items() if not is_adapter_key(k)
              and not k.endswith("_extra_state")}
    model, optimizer = pretrain.wrap_for_training(chunks, config, args, acc)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync
    x = {k: v.double() if v.is_floating_point() else v for k, v in inputs(kwargs, 3, 4, 6, batch=2).items()}
    target = torch.randn(x["latents"].shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def forward_step(_, chunk):
        dit = unwrap(chunk)
        if dit.pre_process:
            out, carry = chunk(x["latents"], x["timestep"], x["context"], carry=None if dit.post_process else target), \
                target
        else:
            out, carry = chunk(), dit.carried
        return out, lambda o: ((o - carry).pow(2).mean(), {"loss": (o - carry).pow(2).mean().detach()})

    losses = []
    for _ in range(STEPS):
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=[None], model=model,
                                          num_microbatches=1, seq_length=1, micro_batch_size=2, forward_only=False)
        ok, _, _ = optimizer.step()
        assert ok
        if mpu.is_pipeline_last_stage():
            losses.append(out[0]["loss"].item())
    after = {k: v for c in chunks for k, v in c.state_dict().items() if k in before}
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    trained = [k for c in chunks for k, p in c.named_parameters() if p.requires_grad]
    buffered = sum(b.numel_unpadded for m in model for b in m.buffers)
    adapter_numel = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    optimized = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    destroy_parallel()
    return losses, unchanged, trained, buffered, adapter_numel, optimized


@pytest.fixture(scope="module")
def one_process():
    return run_distributed(1, _train_worker, [])[0]


@pytest.mark.parametrize("layout", marked_extended(sorted(LAYOUTS), EXTENDED))
def test_lora_training_equals_one_process_and_trains_only_adapters(layout, one_process):
    ref_losses, ref_unchanged, ref_trained, *_ = one_process
    assert ref_unchanged and len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    assert ref_trained and all(".lora_A." in k or ".lora_B." in k for k in ref_trained)
    results = run_distributed(2, _train_worker, LAYOUTS[layout])
    losses = [r[0] for r in results if r[0]]
    for rank_losses in losses:
        torch.testing.assert_close(torch.tensor(rank_losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    for _, unchanged, trained, buffered, adapter_numel, optimized in results:
        assert unchanged, layout  # every base tensor as it was
        assert all(".lora_A." in k or ".lora_B." in k for k in trained)
        # DDP's gradient buffers and the optimizer hold the adapters alone
        assert buffered == adapter_numel == optimized


def _checkpoint_worker(rank, world, flags, directory, save):
    """TP2: train the adapters one step and save them; TP1: load them. Returns the merged weights
    (base + scale B A of each adapted part) in full (TP-merged) diffusers names, and the saved files' names."""
    from megatron.core import parallel_state as mpu

    from mm.ckpt import load_model
    from mm.models.predictor.lora import is_adapter_key
    from mm.models.predictor.wan.weights import WAN_WEIGHTS
    from mm.parallel import destroy_parallel
    from mm.training.checkpointing import save_checkpoint

    multiprocessing.current_process().daemon = False  # megatron-core's writer may start a helper
    args, config, chunks, kwargs, acc, settings = _setup(flags, world)
    if save:
        with torch.no_grad():
            for name, p in chunks[0].named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + rank), dtype=p.dtype))
        save_checkpoint(directory, 1, chunks, None, None, 2, save_optim=False, save_rng=False,
                        predictor=dataclasses.asdict(chunks[0].arch), keep=is_adapter_key, lora=settings.to_dict())
    else:
        load_model(directory, chunks, keep=is_adapter_key, flag="--lora-load", adapters=settings.to_dict())
    state = {k: v for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    tp = mpu.get_tensor_model_parallel_world_size()
    gathered = [None] * tp
    torch.distributed.all_gather_object(gathered, state, group=mpu.get_tensor_model_parallel_group())
    destroy_parallel()
    return WAN_WEIGHTS.mm_to_hf(gathered)


def test_adapters_saved_at_tp2_load_at_tp1(tmp_path):
    from mm.ckpt import read_header

    saved = run_distributed(2, _checkpoint_worker, LAYOUTS["tp2_sp"], str(tmp_path), True)[0]
    loaded = run_distributed(1, _checkpoint_worker, [], str(tmp_path), False)[0]
    adapters = [k for k in saved if ".lora_" in k]
    assert adapters and set(saved) == set(loaded)
    for key in adapters:  # the TP2 shards of A (row-parallel) and B (column-parallel), whole at TP1
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=key)
    header = read_header(tmp_path / "iter_0000001")
    assert header.lora["r"] == 4 and header.lora["targets"]["self_attention.linear_qkv"] == [0, 1, 2]
    # the checkpoint holds the adapters and nothing else (its metadata lists every tensor)
    from torch.distributed.checkpoint import FileSystemReader

    stored = [k for k, v in FileSystemReader(str(tmp_path / "iter_0000001")).read_metadata().state_dict_metadata.items()
              if hasattr(v, "size")]
    assert stored and all(".lora_A." in k or ".lora_B." in k for k in stored), stored
