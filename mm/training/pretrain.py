"""Pre-training of a DiT: the loop behind ``pretrain_t2v.py`` and ``pretrain_i2v.py``.

TP, SP, CP (every algorithm), PP/VPP, DP with megatron-core's DDP and (optionally) distributed
optimizer, recompute, bf16/fp16, the LR schedule, frozen VAE and text encoder on stage 0 (with
VAE-CP, encoder-DP, interleaved offload and text-encoder sharding from the model JSON), checkpoints, EMA, megatron-style
iteration logs and the guards against divergence (``mm.training.divergence``). What is
family-specific (the DiT, its weights, its encoders, the objective, conditioning and FLOPs) is the
family's spec (``mm.families``): its recipe, e.g. Wan's flow matching or Open-Sora-Plan v1.3's DDPM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import zlib
from typing import Sequence

import torch
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from mm.accelerator import destroy_distributed, naming_collective_failures, rank0_print, wait_for_peers
from mm.ckpt import CheckpointError, load_model, unwrap
from mm.data.dataset import SkipCounter, token_keys
from mm.data.features import build_feature_dataloader
from mm.data.loader import build_video_dataloader
from mm.families import family_for
from mm.families.spec import TRAINING_ENTRY_POINTS as TASKS
from mm.models.encoder_dp import encode_data_parallel
from mm.models.encoder_offload import InterleavedEncoderOffload
from mm.models.predictor.lora import add_adapters, is_adapter_key, is_base_key
from mm.models.predictor.pipeline import layer_layout, stage_span
from mm.models.predictor.transformer_config import params_dtype, transformer_config
from mm.models.predictor.name_table import read_weights
from mm.parallel import dynamic_cp, get_encoder_dp_group, get_group, get_group_ranks
from mm.parallel.fsdp import shard_parameters
from mm.runtime import EntryPoint, start
from mm.training.checkpointing import check_load_dir, load_checkpoint, save_checkpoint
from mm.training.checks import check_task
from mm.training.divergence import SkipStreak, TrainingStopped, skip_counts, weights_finite
from mm.training.ema import ModelEMA
from mm.training.logger import SKIP, LogConfig, TrainingLogger, check_loss
from mm.training.optimizer_kernels import use_torch_kernels


def rank_last_print(*args) -> None:
    """print() on the last rank (the last pipeline stage's, as megatron's print_rank_last)."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(*args, flush=True)


def build_model_chunks(family, pred, arch, tf_config: TransformerConfig, vpp: int | None) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual pipeline chunk, each the layers
    ``predictor.pipeline_num_layers`` gives it; the first chunk of stage 0 also embeds, the last chunk
    of the last stage holds the head."""
    pp, stage = mpu.get_pipeline_model_parallel_world_size(), mpu.get_pipeline_model_parallel_rank()
    layout = layer_layout(arch.num_layers, pp, vpp, pred.pipeline_num_layers)
    chunks = []
    for chunk in range(len(layout)):
        offset, count = stage_span(layout, stage, chunk)
        chunks.append(family.build_predictor(
            pred.model_id, arch, tf_config, pre_process=stage == 0 and chunk == 0,
            post_process=stage == pp - 1 and chunk == len(layout) - 1, layer_offset=offset, num_layers=count))
    return chunks


def ddp_config_for(args) -> DistributedDataParallelConfig:
    """megatron-core's DDP settings of a training run: fp32 gradient buffers, the flags' gradient-reduce
    overlap and distributed optimizer (``mm.plan`` lays the buffers out with the same settings)."""
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                                         use_distributed_optimizer=args.use_distributed_optimizer)


def wrap_for_training(chunks: list[torch.nn.Module], tf_config: TransformerConfig, args,
                      acc) -> tuple[list[DistributedDataParallel], object]:
    """megatron-core's DDP around each model chunk (fp32 gradient buffers) and megatron's optimizer
    over them, as the training flags (--optimizer, --lr, --clip-grad, --use-distributed-optimizer,
    --overlap-grad-reduce, ...) set them."""
    ddp_config = ddp_config_for(args)
    model = [DistributedDataParallel(tf_config, ddp_config, chunk.to(acc.device()), disable_bucketing=i > 0)
             for i, chunk in enumerate(chunks)]
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype(args),
        initial_loss_scale=args.initial_loss_scale, loss_scale=args.loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer), model)
    use_torch_kernels(optimizer, acc.fused_adam)  # without transformer-engine / apex: torch's multi-tensor kernels
    return model, optimizer


def shard_text_encoders(text_encoders: list[torch.nn.Module], device: torch.device, prog: str) -> None:
    """``text_encoder_fsdp``: shard each text encoder's ``model`` over the ranks of pipeline stage 0
    (``mm.parallel.fsdp.shard_parameters``), which all encode the same number of micro-batches. The
    encoders come built on the host; sharding moves each unit (a block, then the rest) to ``device`` as
    it shards it, so the device never holds a whole encoder. Rank 0 prints one line: each encoder's
    parameter bytes, whole and per rank."""
    group, ranks = get_group("first_stage"), len(get_group_ranks("first_stage"))
    if group is None:  # the configuration check refuses a stage 0 of one rank
        raise RuntimeError("text_encoder_fsdp: pipeline stage 0 has one rank, nothing to shard over")
    sizes = []
    for encoder in text_encoders:
        whole = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
        held = shard_parameters(encoder.model, group, device.type)
        sizes.append(f"{type(encoder).__name__} {whole} -> {held} bytes ({_mib(whole)} -> {_mib(held)} MiB) per rank")
    if torch.distributed.get_rank() == 0:
        print(f"{prog}: text_encoder_fsdp: text encoders' parameters sharded over the {ranks} ranks of pipeline "
              f"stage 0: {'; '.join(sizes)}", flush=True)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f}"


def entry_point(task: str) -> EntryPoint:
    """What ``pretrain_<task>.py`` validates before any process group (``start``; ``mm.preflight`` before
    torchrun): the flags and JSONs for training, the task's fit to the model and data with the data
    files and output directories (``check_task``), and --load (``check_load_dir``)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}; valid: {', '.join(TASKS)}")
    return EntryPoint(prog=TASKS[task], mode="train",
                      check=lambda config: (check_task(task, config), check_load_dir(config.args)))


def pretrain(argv: Sequence[str] | None = None, task: str = "t2v") -> list[float]:
    """Train; returns the per-iteration losses seen on this rank (the last pipeline stage's; for tests)."""
    entry = entry_point(task)
    runtime = start(argv, mode=entry.mode, prog=entry.prog, check=entry.check, expand=entry.expand)
    try:
        with naming_collective_failures("start-up (models, optimizer, --load)"):
            trainer = Trainer(runtime, task)
        losses = trainer.run()
    except CheckpointError as e:
        _exit_on_checkpoint_error(TASKS[task], e)
    except TrainingStopped as e:  # raised on every rank at the same iteration
        if torch.distributed.get_rank() == 0:
            print(f"{TASKS[task]}: error: {e}", file=sys.stderr, flush=True)
        destroy_distributed()  # its barrier: no rank leaves before rank 0 has said why
        raise SystemExit(1) from None
    with naming_collective_failures("the end of the run"):
        destroy_distributed()
    return losses


def _exit_on_checkpoint_error(prog: str, error: CheckpointError) -> None:
    """A checkpoint that cannot be loaded or saved ends the run with its one message (exit code 1)
    instead of every rank's traceback. Load and save errors are raised on every rank alike (the
    ranks agree on them), so rank 0 prints it; the barrier of ``destroy_distributed`` keeps the
    others from exiting first (the launcher would stop rank 0 before it printed)."""
    if torch.distributed.get_rank() == 0:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    try:
        destroy_distributed()
    except Exception:  # noqa: BLE001 -- exiting anyway; a rank that is gone cannot join the barrier
        pass
    raise SystemExit(1)


class Trainer:
    """One training run: this rank's model chunks, optimizer, LR schedule and EMA; on stage 0 the
    frozen encoders and the data; the iterations, logs and checkpoints."""

    def __init__(self, runtime, task: str):
        cfg, args, acc = runtime.config, runtime.config.args, runtime.accelerator
        self.cfg, self.args, self.acc, self.task = cfg, args, acc, task
        self.device, self.dtype = acc.device(), params_dtype(args)
        pred = cfg.model.predictor
        self.family = family_for(pred.model_id)
        self.arch = self.family.arch(pred)
        self.recipe = self.family.recipe(args, cfg, self.arch)
        self.lora = self.family.lora_settings(args)  # --lora-r: adapters on the frozen DiT (checked before start)
        self.tf_config = transformer_config(args, self.arch, acc.is_cpu, cfg.virtual_pipeline_size)
        self.model, self.optimizer = wrap_for_training(self._chunks(), self.tf_config, args, acc)
        # dynamic DP/CP (the model JSON's use_dynamic_dpcp): every DP x CP rank reads its own micro-batches
        # and the CP degree is chosen per iteration (mm.parallel.dynamic_cp); self.dp counts the readers
        self.dynamic = cfg.model.use_dynamic_dpcp and bool(dynamic_cp.degrees())
        self.dp = mpu.get_data_parallel_world_size(with_context_parallel=self.dynamic)
        self.dp_rank = mpu.get_data_parallel_rank(with_context_parallel=self.dynamic)
        self.queue: list = []  # dynamic DP/CP: this iteration's ((origin, micro), batch), in the order run
        self.gbs = args.global_batch_size or args.micro_batch_size * self.dp
        self.num_micro = self.gbs // (args.micro_batch_size * self.dp)
        self.scheduler = self._scheduler()
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.ema = ModelEMA(self.model, args.ema_decay, args.ema_start_iter) if args.ema_decay is not None else None
        # --load: resume (model, optimizer, scheduler, RNG, iteration, consumed samples) or, with
        # --finetune / --no-load-optim, start from the weights; a directory without a checkpoint yet
        # (a first launch with --load = --save) starts from scratch, so relaunching resumes
        # (a damaged latest checkpoint is an error, or with --load-fallback gives way to an earlier one)
        self.start_iteration, consumed = 0, 0
        self.loaded = None  # the checkpoint directory loaded: --keep-last-checkpoints never deletes it
        if self.lora is not None:
            # LoRA: --load (or predictor.from_pretrained) is the base, its weights alone; --lora-load the adapters,
            # resumed as a whole run resumes (optimizer, schedule, RNG, iteration, data position)
            if args.load is not None:
                load_model(args.load, self.model, keep=is_base_key)
            if args.lora_load is not None:
                resumed = load_checkpoint(
                    args.lora_load, self.model, self.optimizer, self.scheduler, load_optim=not args.no_load_optim,
                    load_rng=not args.no_load_rng, finetune=args.finetune, fallback=args.load_fallback,
                    flag="--lora-load", keep=is_adapter_key, adapters=self.lora.to_dict())
                (self.start_iteration, consumed), self.loaded = resumed, resumed.path
        elif args.load is not None:
            resumed = load_checkpoint(
                args.load, self.model, self.optimizer, self.scheduler, load_optim=not args.no_load_optim,
                load_rng=not args.no_load_rng, finetune=args.finetune, ema=self.ema, fallback=args.load_fallback)
            (self.start_iteration, consumed), self.loaded = resumed, resumed.path
        model = self.model
        self.tf_config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        if args.overlap_grad_reduce:
            self.tf_config.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else \
                model[0].start_grad_sync
        self.first_stage = mpu.is_pipeline_first_stage(ignore_virtual=True)
        self.last_stage = mpu.is_pipeline_last_stage(ignore_virtual=True)
        self.skips = SkipCounter()
        self.bad_samples_seen, self.bad_samples_summary = 0, None  # the job's count and summary, as last gathered
        # stage 0 holds the frozen encoders and reads the data (MindSpeed-MM's layout)
        self.batches = self._batches(consumed) if self.first_stage else None
        cfg.data.sources = None  # what the configuration check read of data.txt: the loader holds it now
        self.streak = SkipStreak(args.max_consecutive_skipped_iterations)
        self.last_saved: int | None = None  # the last iteration this run saved
        # noise and noise level of each sample from a seed of (run seed, iteration, the sample's place
        # in the global batch): the same on every TP/CP/PP rank of a replica, and the same under any DP
        # size and micro-batch size that puts the same samples in an iteration (and after a resume)
        self.noise_gen, self.level_gen = torch.Generator(device=self.device), torch.Generator()
        self.iteration, self.micro = 0, 0
        # model FLOPs of an iteration's micro-batches, counted once per DP replica (stage 0, TP/CP rank 0)
        tp_cp_rank0 = mpu.get_tensor_model_parallel_rank() == 0 and (self.dynamic or mpu.get_context_parallel_rank() == 0)
        self.counts_flops = self.first_stage and tp_cp_rank0
        self.reads_data = self.counts_flops and self.dp_rank == 0
        self.flops = 0.0
        # with PP > 1, stage 0 builds the frozen encoders (loading their weights can take minutes):
        # the later stages wait for it here, outside any collective, not in their first receive
        wait_for_peers("the first iteration (every stage's models, encoders and data ready)")

    def _chunks(self) -> list[torch.nn.Module]:
        args, pred = self.args, self.cfg.model.predictor
        chunks = build_model_chunks(self.family, pred, self.arch, self.tf_config, self.cfg.virtual_pipeline_size)
        if args.compile_dit_blocks:
            for chunk in chunks:
                chunk.compile_blocks()
        if pred.from_pretrained:  # full release weights: this stage's layers, split for this TP rank
            source = read_weights(pred.from_pretrained)
            for chunk in chunks:
                self.family.load_weights(chunk, source, args.tensor_model_parallel_size,
                                         mpu.get_tensor_model_parallel_rank())
        if self.lora is not None:
            for chunk in chunks:
                add_adapters(chunk, self.lora, args.seed, self.family.lora_part_counts())
            trained = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
            total = sum(p.numel() for c in chunks for p in c.parameters())
            rank0_print(f"{TASKS[self.task]}: LoRA r {self.lora.r}, alpha {self.lora.alpha:g} on "
                        f"{', '.join(f'{k} {list(v)}' for k, v in self.lora.targets.items())}: rank 0 trains "
                        f"{trained} of its {total} DiT parameters ({100 * trained / max(total, 1):.2f}%)")
        return chunks

    def _scheduler(self) -> OptimizerParamScheduler:
        args, gbs = self.args, self.gbs
        warmup = args.lr_warmup_iters if args.lr_warmup_fraction is None else \
            int(args.lr_warmup_fraction * args.train_iters)
        return OptimizerParamScheduler(
            self.optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=warmup * gbs, lr_decay_steps=(args.lr_decay_iters or args.train_iters) * gbs,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant")

    def _batches(self, consumed: int):
        """Stage 0's encoded micro-batches, resuming after ``consumed`` samples: from the videos through
        the frozen encoders, or (``dataset_type: feature``) read from extract_features.py's files."""
        cfg, args, device, recipe = self.cfg, self.args, self.device, self.recipe
        if cfg.data.features:
            loader, _ = build_feature_dataloader(cfg.data, self.family.num_text_encoders, args.micro_batch_size,
                                                 self.dp_rank, self.dp, consumed_samples=consumed,
                                                 num_workers=args.num_workers, seed=args.seed,
                                                 pin_memory=not self.acc.is_cpu)
            return (features_to(batch, device, self.dtype) for batch in loader)
        vae, text_encoders, image_encoder, lengths = build_frozen_encoders(self.family, cfg, recipe, self.dtype,
                                                                           device, TASKS[self.task])
        loader, _ = build_video_dataloader(cfg.data, args.micro_batch_size, self.dp_rank, self.dp,
                                           consumed_samples=consumed, num_workers=args.num_workers, seed=args.seed,
                                           pin_memory=not self.acc.is_cpu, tokenizer_factory=self.family.tokenizer,
                                           max_lengths=lengths)
        encode = BatchEncoder(cfg, recipe, vae, text_encoders, image_encoder, device, self.dtype, args.seed,
                              first_batch=self.start_iteration * self.num_micro)
        # encoder_offload_interval > 1: encoders on the device only while encoding the next N micro-batches
        offload = InterleavedEncoderOffload([e for e in (vae, *text_encoders, image_encoder) if e is not None],
                                            cfg.model.encoder_offload_interval, device)
        return offload.iterate(loader, encode)

    def _sample_noise(self, latents: torch.Tensor, micro: int, reader: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and levels of the ``micro``-th micro-batch data-parallel rank ``reader`` read."""
        args, noise, levels = self.args, [], []
        for i in range(latents.shape[0]):
            place = micro * args.micro_batch_size * self.dp + reader * args.micro_batch_size + i
            seed = (args.seed * 1_000_003 + self.iteration) * 1_000_003 + place
            self.noise_gen.manual_seed(seed)
            self.level_gen.manual_seed(seed)
            n, level = self.recipe.draw(latents.shape[1:], self.noise_gen, self.level_gen, place, self.gbs,
                                        self.device)
            noise.append(n)
            levels.append(level)
        return torch.stack(noise).to(self.dtype), torch.cat(levels)

    def forward_step(self, data_iterator, chunk):
        """megatron-core's forward step: stage 0 reads and encodes a micro-batch and calls its chunk;
        later stages read the previous stage's message; the loss is the recipe's."""
        dit = unwrap(chunk)
        if dit.pre_process:
            if self.dynamic:  # a CP group member's micro-batch (its reader counted its skips)
                (reader, micro), batch = self.queue.pop(0)
            else:
                batch, reader, micro = next(self.batches), self.dp_rank, self.micro
                self.skips.update(batch)
            self.micro += 1
            noise, levels = self._sample_noise(batch["latents"], micro, reader)
            inputs = self.recipe.step(batch, noise, levels)
            if self.counts_flops and reader == self.dp_rank:  # each sample's FLOPs once, by its reader
                self.flops += inputs.flops
            carry = inputs.carry
            # later stages get the target through the pipeline, inside the stage message
            output = chunk(*inputs.args, carry=None if dit.post_process else carry)
        else:
            output = chunk()
            carry = dit.carried

        def loss_func(out):
            loss = self.recipe.loss(out, carry)
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    def _dynamic_layout(self) -> int:
        """Dynamic DP/CP: read this rank's micro-batches, choose the iteration's CP degree from the largest
        video over the DP x CP ranks, and queue the micro-batches of this rank's CP group (broadcast by
        their readers) in ``dynamic_cp.assignment``'s order; returns the CP degree."""
        model = self.cfg.model
        own = [next(self.batches) for _ in range(self.num_micro)]
        for batch in own:
            self.skips.update(batch)
        largest = dynamic_cp.largest_numel(max(int(b["video_numel"]) for b in own),
                                           mpu.get_data_parallel_group(with_context_parallel=True), self.device)
        cp = dynamic_cp.choose_cp(largest, dynamic_cp.degrees(), model.max_seq_size)
        group, ranks = dynamic_cp.cp_group_of_strategy(cp)
        first = self.dp_rank - self.dp_rank % cp
        if ranks != list(range(first, first + cp)):  # TP = PP = 1: the DP x CP index is the rank
            raise RuntimeError(f"dynamic DP/CP: CP group {ranks} is not ranks {first}..{first + cp - 1}")
        members = dynamic_cp.exchange_batches(own, group if cp > 1 else None, ranks, self.device)
        self.queue = [((reader, micro), members[reader - first][micro])
                      for reader, micro in dynamic_cp.assignment(self.dp, cp, self.num_micro)[self.dp_rank]]
        rank0_print(f"{TASKS[self.task]}: iteration {self.iteration}: dynamic DP/CP: "
                    f"{dynamic_cp.describe(cp, self.dp)}, largest micro-batch video {largest} elements "
                    f"(max_seq_size {model.max_seq_size})")
        return cp

    def train_step(self, forward_backward) -> dict:
        """One iteration: forward and backward of every micro-batch, then (unless a loss was NaN/Inf
        anywhere) the optimizer, LR and EMA steps. Returns what the log needs."""
        args, model = self.args, self.model
        self.micro, self.flops = 0, 0.0
        for m in model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        cp, layout = 1, contextlib.nullcontext()
        if self.dynamic:
            cp = self._dynamic_layout()
            layout = dynamic_cp.use_strategy(cp)
        with layout:  # under dynamic DP/CP: the iteration's CP and DP groups; megatron scales each loss by CP / micro-batches
            step_losses = forward_backward(forward_step_func=self.forward_step, data_iterator=[None] * len(model),
                                           model=model, num_microbatches=self.num_micro * cp, seq_length=1,
                                           micro_batch_size=args.micro_batch_size, forward_only=False)
        loss = None
        if self.last_stage:
            # dynamic DP/CP: the members of a CP group saw the same samples; the mean over all DP x CP ranks
            # is the mean over the global batch
            loss = torch.stack([entry["loss"] for entry in step_losses]).mean()
            torch.distributed.all_reduce(loss, group=mpu.get_data_parallel_group(with_context_parallel=self.dynamic))
            loss = loss.item() / self.dp
        # one all-reduce tells every rank the iteration's FLOPs, whether any loss was NaN/Inf (then no
        # rank steps: the optimizer step has collectives) and the job's bad samples so far (each data-
        # parallel replica's reader counts its own: stage 0, TP and CP rank 0)
        verdict = check_loss(loss, False, self.iteration)  # --exit-on-nan-loss: below, on every rank together
        bad_samples = sum(self.skips.counts.values()) if self.counts_flops else 0
        shared = torch.tensor([self.flops, float(verdict == SKIP), float(bad_samples)], dtype=torch.float64,
                              device=self.device)
        torch.distributed.all_reduce(shared)
        nan_loss = skipped = shared[1].item() > 0
        if skipped and args.exit_on_nan_loss:
            raise SystemExit(f"{TASKS[self.task]}: the loss is NaN/Inf at iteration {self.iteration}; stopping "
                             "because of --exit-on-nan-loss")
        grad_norm = None
        if not skipped:
            ok, grad_norm, _ = self.optimizer.step()
            skipped = not ok  # fp16 loss-scale overflow
            if ok:
                self.scheduler.step(increment=self.gbs)
                if self.ema is not None:
                    self.ema.update(self.iteration)
        return {"loss": loss, "skipped": skipped, "nan_loss": nan_loss, "overflow": skipped and not nan_loss,
                "grad_norm": None if grad_norm is None else float(grad_norm), "flops": shared[0].item(),
                "bad_samples": int(shared[2].item())}

    def bad_samples(self, total: int) -> str | None:
        """The bad-sample summary of the whole job (every data-parallel replica's reader), for the rank
        that logs it (stage 0, TP/CP/DP rank 0); None elsewhere and while there is none. ``total``: the
        job's count, the same on every rank; when it changed, the readers gather their counts by reason
        over their data-parallel group."""
        if total == 0:
            return None
        if total != self.bad_samples_seen:
            self.bad_samples_seen = total
            if self.counts_flops:
                self.bad_samples_summary = self.skips.gathered(
                    mpu.get_data_parallel_group(with_context_parallel=self.dynamic)).summary()
        return self.bad_samples_summary if self.reads_data else None

    def counts_toward_stop(self, step: dict) -> bool:
        """Whether this iteration's skip counts toward --max-consecutive-skipped-iterations
        (``mm.training.divergence.skip_counts``)."""
        args = self.args
        scale = self.optimizer.get_loss_scale().item() if args.fp16 and step["overflow"] else None
        return skip_counts(step["nan_loss"], step["overflow"], scale, OptimizerConfig.min_loss_scale,
                           static_scale=args.loss_scale is not None)

    def stop_message(self, iteration: int) -> str:
        args, streak = self.args, self.streak
        saved = ""
        if args.save is not None:
            saved = (f" --save {args.save}: this run saved no checkpoint" if self.last_saved is None else
                     f" --save {args.save}: the last checkpoint this run saved is iteration {self.last_saved}") + \
                "; none is saved while the loss is NaN/Inf."
        why = "a NaN/Inf loss" + (", or an fp16 overflow at the lowest loss scale" if args.fp16 else "")
        # the weights of the iteration before the streak are those its losses came from
        resume = f" from a checkpoint of an iteration before {streak.first - 1}" if streak.first > 1 else ""
        return (f"stopping at iteration {iteration}: {streak.length} iterations in a row ({streak.first} to "
                f"{iteration}) were skipped without an update ({why}), the limit of "
                f"--max-consecutive-skipped-iterations {streak.limit} (0: never stop). The model diverged or the "
                f"data holds bad values: lower --lr or lengthen the warm-up (--lr-warmup-iters), check the data, "
                f"and resume{resume}.{saved}")

    def save(self, iteration: int) -> None:
        """Save iteration ``iteration``, unless a weight (or EMA average) on any rank is NaN/Inf: then
        TrainingStopped, with the --save directory untouched."""
        with naming_collective_failures(f"the checkpoint save of iteration {iteration}"):
            self._save(iteration)

    def _save(self, iteration: int) -> None:
        args = self.args
        if not weights_finite(self.model, None if self.ema is None else self.ema.averages):
            kept = "this run saved no checkpoint" if self.last_saved is None else \
                f"the last checkpoint this run saved is iteration {self.last_saved}"
            raise TrainingStopped(
                f"iteration {iteration}: the model weights hold NaN/Inf values; refusing to save them. --save "
                f"{args.save} is left as it was ({kept}). An update diverged: lower --lr or lengthen the warm-up "
                f"(--lr-warmup-iters), clip the gradients (--clip-grad), and resume from a checkpoint with finite "
                f"weights.")
        save_checkpoint(args.save, iteration, self.model, self.optimizer, self.scheduler, iteration * self.gbs,
                        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng,
                        entry_point=TASKS[self.task], predictor=dataclasses.asdict(self.arch),
                        pipeline_layers=self.cfg.model.predictor.pipeline_num_layers,
                        ckpt_format=args.ckpt_format, ema=self.ema, keep_last=args.keep_last_checkpoints,
                        protect=self.loaded, keep=None if self.lora is None else is_adapter_key,
                        lora=None if self.lora is None else self.lora.to_dict())
        self.last_saved = iteration

    def run(self) -> list[float]:
        """Iterations ``start + 1 .. --train-iters`` (or to --exit-interval); the losses of the last stage.

        A save that falls on an iteration whose loss was NaN/Inf waits for the next iteration that
        updates the model (those weights may have diverged); TrainingStopped after
        --max-consecutive-skipped-iterations skipped iterations in a row, or at a save of non-finite
        weights."""
        args, acc, prog = self.args, self.acc, TASKS[self.task]
        logger = TrainingLogger(LogConfig.from_args(args), torch.distributed.get_rank(),
                                torch.distributed.get_world_size(), run_config=vars(args), on_cpu=acc.is_cpu)
        losses = []
        forward_backward = get_forward_backward_func()
        if self.start_iteration >= args.train_iters:
            rank_last_print(f"{prog}: the checkpoint is at iteration {self.start_iteration}, --train-iters is "
                            f"{args.train_iters}: nothing to train")
        saved = reached = self.start_iteration  # the last iteration saved / trained
        waiting = nan_loss = False  # a save held back by a NaN/Inf loss; the last iteration's loss was NaN/Inf
        try:
            for iteration in range(self.start_iteration + 1, args.train_iters + 1):
                self.iteration = iteration
                start_time = time.perf_counter()
                with naming_collective_failures(f"training iteration {iteration}"):
                    step = self.train_step(forward_backward)
                    if step["loss"] is not None:
                        losses.append(step["loss"])
                    acc.synchronize()
                    elapsed = time.perf_counter() - start_time
                    logger.log(iteration=iteration, train_iters=args.train_iters, consumed_samples=iteration * self.gbs,
                               global_batch_size=self.gbs, elapsed_s=elapsed,
                               learning_rate=self.optimizer.param_groups[0]["lr"], loss=step["loss"],
                               grad_norm=step["grad_norm"], skipped=step["skipped"], flops=step["flops"],
                               max_memory_bytes=acc.max_memory_allocated(),
                               loss_scale=self.optimizer.get_loss_scale().item() if args.fp16 else None,
                               bad_samples=self.bad_samples(step["bad_samples"]))
                reached, nan_loss = iteration, step["nan_loss"]
                self.streak.update(iteration, self.counts_toward_stop(step))
                if self.streak.exceeded:
                    raise TrainingStopped(self.stop_message(iteration))
                if args.save is not None and (waiting or args.save_interval and iteration % args.save_interval == 0):
                    if nan_loss:
                        if not waiting:
                            rank0_print(f"{prog}: not saving at iteration {iteration}: its loss is NaN/Inf, so the "
                                        "weights may have diverged; the save waits for an iteration that updates "
                                        "the model")
                        waiting = True
                    else:
                        self.save(iteration)
                        saved, waiting = iteration, False
                if args.exit_interval and iteration % args.exit_interval == 0 and iteration < args.train_iters:
                    rank_last_print(f"{prog}: exiting at iteration {iteration} (--exit-interval {args.exit_interval})")
                    break
            if args.save is not None and saved < reached:  # the end, or an --exit-interval stop
                if nan_loss:
                    rank0_print(f"{prog}: not saving iteration {reached}: its loss is NaN/Inf, so the weights may "
                                "have diverged" + ("" if self.last_saved is None else
                                                   f"; the last checkpoint is iteration {self.last_saved}"))
                else:
                    self.save(reached)
        finally:
            logger.close()
        return losses


def build_frozen_encoders(family, cfg, recipe, dtype: torch.dtype, device, prog: str):
    """The frozen encoders of stage 0 on ``device``: the VAE, the text encoders (sharded with
    ``text_encoder_fsdp``) and the recipe's image encoder (or None); with each text encoder's token
    length (its ``tokenizer_config``'s ``model_max_length``, else the family's)."""
    # patch.ae_float32 (MindSpeed-MM's): the VAE computes in fp32 whatever the run's precision
    vae = family.build_vae(cfg.model.ae, torch.float32 if cfg.model.ae_float32 else dtype).to(device)
    lengths = [int(tokenizer.get("model_max_length", family.text_max_length(i)))
               for i, tokenizer in enumerate(cfg.data.tokenizers)]
    text_encoders = [family.text_encoders(text, length, recipe.text_zero_padding)
                     for text, length in zip(cfg.model.text_encoder, lengths)]
    if cfg.model.text_encoder_fsdp:
        shard_text_encoders(text_encoders, device, prog)
    else:
        text_encoders = [encoder.to(device) for encoder in text_encoders]
    image_encoder = recipe.build_image_encoder(cfg)
    image_encoder = None if image_encoder is None else image_encoder.to(device)
    return vae, text_encoders, image_encoder, lengths


def features_to(batch: dict, device, dtype: torch.dtype) -> dict:
    """A batch of pre-extracted features (``mm.data.features``) on ``device``: what ``BatchEncoder``
    returns for the videos, the embeddings and latents in the run's ``dtype``."""
    def move(t, cast=True):
        return None if t is None else t.to(device, dtype if cast else None, non_blocking=True)

    return {"latents": move(batch["latents"]), "context": [move(c) for c in batch["context"]],
            "context_mask": [move(m, cast=False) for m in batch["context_mask"]], "skipped": batch["skipped"],
            "condition": move(batch["condition"]), "context_image": move(batch["context_image"]),
            "path": batch["path"],
            "video_numel": batch["latents"].numel()}  # dynamic DP/CP's measure: the latents are the video here


class BatchEncoder:
    """batch -> {latents, context, context_mask, condition, context_image, skipped}: the frozen
    encoders (``context`` / ``context_mask``: one embedding and mask per text encoder, in order), with
    VAE-CP (``ae.vae_cp_size``) and encoder-DP (``enable_encoder_dp``) when the model JSON asks for
    them; the recipe encodes its condition. ``seeds`` (one per sample, from the run seed, the number of
    batches this rank encoded since the run began, resumes included, and the sample's file) drive random
    conditions such as Open-Sora-Plan's masks."""

    def __init__(self, cfg, recipe, vae, text_encoders, image_encoder, device, dtype, seed: int,
                 first_batch: int = 0):
        self.recipe, self.vae, self.text_encoders, self.image_encoder = recipe, vae, text_encoders, image_encoder
        self.device, self.dtype, self.seed, self.batches = device, dtype, seed, first_batch
        self.vae_cp = (get_group("vae_cp"), get_group_ranks("vae_cp")) if cfg.sizes.vae_cp_size > 1 else None
        self.group = get_encoder_dp_group() if cfg.model.enable_encoder_dp else None

    def encode_dp(self, fn, *tensors):
        return encode_data_parallel(fn, *tensors, group=self.group)

    def _encode_video(self, video):
        return self.vae.normalize(self.vae.encode(video, vae_cp=self.vae_cp)[0])

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        device, dtype = self.device, self.dtype
        video = batch["video"].to(device, dtype, non_blocking=True)
        tokens = [(batch[ids_key].to(device, non_blocking=True), batch[mask_key].to(device, non_blocking=True))
                  for ids_key, mask_key in token_keys(len(self.text_encoders))]
        batch = dict(batch, seeds=torch.tensor(
            [((self.seed * 1_000_003 + self.batches) * 1_000_003 + zlib.crc32(path.encode())) % (1 << 62)
             for path in batch["path"]], dtype=torch.int64))
        self.batches += 1
        condition, context_image = self.recipe.encode_condition(self.vae, batch, video, self.vae_cp,
                                                                self.image_encoder, self.encode_dp, dtype)
        contexts = [self.encode_dp(lambda i, m, enc=encoder: enc.encode(i, m).to(dtype), ids, mask)
                    for encoder, (ids, mask) in zip(self.text_encoders, tokens)]
        return {"latents": self.encode_dp(self._encode_video, video), "context": contexts,
                "video_numel": video.numel(),  # dynamic DP/CP's measure (MindSpeed-MM's: the video's)
                "context_mask": [mask for _, mask in tokens], "skipped": batch["skipped"], "condition": condition,
                "context_image": context_image}
