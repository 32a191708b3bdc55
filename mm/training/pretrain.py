"""Pre-training of a DiT: the loop behind ``pretrain_t2v.py`` and ``pretrain_i2v.py``.

TP, SP, CP (every algorithm), PP/VPP, DP with megatron-core's DDP and (optionally) distributed
optimizer, recompute, bf16/fp16, the LR schedule, frozen VAE and text encoder on stage 0 (with
VAE-CP, encoder-DP and interleaved offload from the model JSON), checkpoints, EMA and megatron-style
iteration logs. What is family-specific (the DiT, its weights, its encoders, the objective,
conditioning and FLOPs) is the family's spec (``mm.families``): its recipe, e.g. Wan's flow matching
or Open-Sora-Plan v1.3's DDPM.
"""

from __future__ import annotations

import dataclasses
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

from mm.accelerator import destroy_distributed
from mm.ckpt import unwrap
from mm.data.dataset import SkipCounter, token_keys
from mm.data.loader import build_video_dataloader
from mm.families import family_for
from mm.families.spec import TRAINING_ENTRY_POINTS as TASKS
from mm.models.encoder_dp import encode_data_parallel
from mm.models.encoder_offload import InterleavedEncoderOffload
from mm.models.predictor.transformer_config import params_dtype, transformer_config
from mm.models.image_encoder import ClipImageEncoder
from mm.models.predictor.pipeline import layer_layout, stage_span
from mm.models.predictor.wan import read_weights
from mm.parallel import get_encoder_dp_group, get_group, get_group_ranks
from mm.runtime import start
from mm.training.checkpointing import check_load_dir, load_checkpoint, save_checkpoint
from mm.training.ema import ModelEMA
from mm.training.logger import SKIP, LogConfig, TrainingLogger, check_loss
from mm.training.optimizer_kernels import use_torch_kernels
from mm.training.checks import check_task


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


def wrap_for_training(chunks: list[torch.nn.Module], tf_config: TransformerConfig, args,
                      acc) -> tuple[list[DistributedDataParallel], object]:
    """megatron-core's DDP around each model chunk (fp32 gradient buffers) and megatron's optimizer
    over them, as the training flags (--optimizer, --lr, --clip-grad, --use-distributed-optimizer,
    --overlap-grad-reduce, ...) set them."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
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


def pretrain(argv: Sequence[str] | None = None, task: str = "t2v") -> list[float]:
    """Train; returns the per-iteration losses seen on this rank (the last pipeline stage's; for tests)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}; valid: {', '.join(TASKS)}")
    runtime = start(argv, mode="train", prog=TASKS[task],
                    check=lambda config: (check_task(task, config), check_load_dir(config.args)))
    args, cfg = runtime.config.args, runtime.config
    acc = runtime.accelerator
    device, dtype = acc.device(), params_dtype(args)
    pred = cfg.model.predictor
    family = family_for(pred.model_id)
    arch = family.arch(pred)
    recipe = family.recipe(args, cfg, arch)
    vpp = cfg.virtual_pipeline_size
    tf_config = transformer_config(args, arch, acc.is_cpu, vpp)
    chunks = build_model_chunks(family, pred, arch, tf_config, vpp)
    if args.compile_dit_blocks:
        for chunk in chunks:
            chunk.compile_blocks()
    if pred.from_pretrained:  # full release weights: this stage's layers, split for this TP rank
        source = read_weights(pred.from_pretrained)
        for chunk in chunks:
            family.load_weights(chunk, source, args.tensor_model_parallel_size, mpu.get_tensor_model_parallel_rank())
        del source
    model, optimizer = wrap_for_training(chunks, tf_config, args, acc)
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    num_micro = gbs // (args.micro_batch_size * dp)
    warmup = args.lr_warmup_iters if args.lr_warmup_fraction is None else int(args.lr_warmup_fraction * args.train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup * gbs,
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * gbs, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant")
    tf_config.finalize_model_grads_func = finalize_model_grads
    # --load: resume (model, optimizer, scheduler, RNG, iteration, consumed samples) or, with
    # --finetune / --no-load-optim, start from the weights; a directory without a checkpoint yet
    # (a first launch with --load = --save) starts from scratch, so relaunching resumes
    ema = ModelEMA(model, args.ema_decay, args.ema_start_iter) if args.ema_decay is not None else None
    start_iteration, consumed = 0, 0
    if args.load is not None:
        start_iteration, consumed = load_checkpoint(args.load, model, optimizer, scheduler,
                                                    load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
                                                    finetune=args.finetune, ema=ema)
    tf_config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if args.overlap_grad_reduce:
        tf_config.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync

    first_stage = mpu.is_pipeline_first_stage(ignore_virtual=True)
    last_stage = mpu.is_pipeline_last_stage(ignore_virtual=True)
    skips = SkipCounter()
    batches = None
    if first_stage:  # stage 0 holds the frozen encoders and reads the data (MindSpeed-MM's layout)
        vae = family.build_vae(cfg.model.ae, dtype).to(device)
        text_encoders = [family.text_encoders(text, int(tokenizer.get("model_max_length", 512)),
                                              recipe.text_zero_padding).to(device)
                         for text, tokenizer in zip(cfg.model.text_encoder, cfg.data.tokenizers)]
        image_encoder = None
        if recipe.uses_image_encoder:
            image = cfg.model.image_encoder
            image_encoder = ClipImageEncoder(image.from_pretrained, image.dtype or "fp32").to(device)
        loader, _ = build_video_dataloader(cfg.data, args.micro_batch_size, dp_rank, dp, consumed_samples=consumed,
                                           num_workers=args.num_workers, seed=args.seed,
                                           pin_memory=not acc.is_cpu)
        encode = _batch_encoder(cfg, recipe, vae, text_encoders, image_encoder, device, dtype, args.seed,
                                first_batch=start_iteration * num_micro)
        # encoder_offload_interval > 1: encoders on the device only while encoding the next N micro-batches
        offload = InterleavedEncoderOffload([e for e in (vae, *text_encoders, image_encoder) if e is not None],
                                            cfg.model.encoder_offload_interval, device)
        batches = offload.iterate(loader, encode)
    # noise and timestep of each sample from a seed of (run seed, iteration, the sample's place in the
    # global batch): the same on every TP/CP/PP rank of a replica, and the same under any DP size and
    # micro-batch size that puts the same samples in an iteration (and after a resume)
    rng = {"noise": torch.Generator(device=device), "sigmas": torch.Generator()}
    step = {"iteration": 0, "micro": 0}
    global_micro = args.micro_batch_size * dp

    def sample_noise(latents):
        noise, levels = [], []
        for i in range(latents.shape[0]):
            place = step["micro"] * global_micro + dp_rank * args.micro_batch_size + i
            seed = (args.seed * 1_000_003 + step["iteration"]) * 1_000_003 + place
            for gen in rng.values():
                gen.manual_seed(seed)
            n, level = recipe.draw(latents.shape[1:], rng["noise"], rng["sigmas"], place, gbs, device)
            noise.append(n)
            levels.append(level)
        step["micro"] += 1
        return torch.stack(noise).to(dtype), torch.cat(levels)

    def forward_step(data_iterator, chunk):
        dit = unwrap(chunk)
        if dit.pre_process:
            batch = next(batches)
            skips.update(batch)
            noise, levels = sample_noise(batch["latents"])
            inputs = recipe.step(batch, noise, levels)
            if counts_flops:
                flops["sum"] += inputs.flops
            carry = inputs.carry
            # later stages get the target through the pipeline, inside the stage message
            output = chunk(*inputs.args, carry=None if dit.post_process else carry)
        else:
            output = chunk()
            carry = dit.carried

        def loss_func(out):
            loss = recipe.loss(out, carry)
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    # model FLOPs of this iteration's micro-batches, counted once per DP replica (stage 0, TP/CP rank 0)
    counts_flops = first_stage and mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_context_parallel_rank() == 0
    flops = {"sum": 0.0}
    logger = TrainingLogger(LogConfig.from_args(args), torch.distributed.get_rank(), torch.distributed.get_world_size(),
                            run_config=vars(args))
    def save(iteration):
        save_checkpoint(args.save, iteration, model, optimizer, scheduler, iteration * gbs,
                        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng,
                        entry_point=TASKS[task], predictor=dataclasses.asdict(arch),
                        pipeline_layers=pred.pipeline_num_layers,
                        ckpt_format=args.ckpt_format, ema=ema)

    losses = []
    forward_backward = get_forward_backward_func()
    if start_iteration >= args.train_iters:
        rank_last_print(f"{TASKS[task]}: the checkpoint is at iteration {start_iteration}, --train-iters is "
                        f"{args.train_iters}: nothing to train")
    saved = reached = start_iteration  # the last iteration saved / trained
    for iteration in range(start_iteration + 1, args.train_iters + 1):
        step.update(iteration=iteration, micro=0)
        flops["sum"] = 0.0
        start_time = time.perf_counter()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        step_losses = forward_backward(forward_step_func=forward_step, data_iterator=[None] * len(model), model=model,
                                       num_microbatches=num_micro, seq_length=1, micro_batch_size=args.micro_batch_size,
                                       forward_only=False)
        loss = None
        if last_stage:
            loss = torch.stack([entry["loss"] for entry in step_losses]).mean()
            torch.distributed.all_reduce(loss, group=mpu.get_data_parallel_group())
            loss = loss.item() / dp
            losses.append(loss)
        # one all-reduce tells every rank the iteration's FLOPs and whether any loss was NaN/Inf
        # (then no rank steps: the optimizer step has collectives)
        verdict = check_loss(loss, False, iteration)  # --exit-on-nan-loss: below, on every rank together
        shared = torch.tensor([flops["sum"], float(verdict == SKIP)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(shared)
        skipped = shared[1].item() > 0
        if skipped and args.exit_on_nan_loss:
            raise SystemExit(f"{TASKS[task]}: the loss is NaN/Inf at iteration {iteration}; stopping because of "
                             "--exit-on-nan-loss")
        grad_norm = None
        if not skipped:
            ok, grad_norm, _ = optimizer.step()
            skipped = not ok  # fp16 loss-scale overflow
            if ok:
                scheduler.step(increment=gbs)
                if ema is not None:
                    ema.update(iteration)
        acc.synchronize()
        elapsed = time.perf_counter() - start_time
        reads_data = first_stage and mpu.get_tensor_model_parallel_rank() == 0 and \
            mpu.get_context_parallel_rank() == 0 and dp_rank == 0
        logger.log(iteration=iteration, train_iters=args.train_iters, consumed_samples=iteration * gbs,
                   global_batch_size=gbs, elapsed_s=elapsed, learning_rate=optimizer.param_groups[0]["lr"], loss=loss,
                   grad_norm=None if grad_norm is None else float(grad_norm), skipped=skipped,
                   flops=shared[0].item(), max_memory_bytes=acc.max_memory_allocated(),
                   loss_scale=optimizer.get_loss_scale().item() if args.fp16 else None,
                   bad_samples=skips.summary() if reads_data and sum(skips.counts.values()) else None)
        reached = iteration
        if args.save is not None and args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
            saved = iteration
        if args.exit_interval and iteration % args.exit_interval == 0 and iteration < args.train_iters:
            rank_last_print(f"{TASKS[task]}: exiting at iteration {iteration} (--exit-interval {args.exit_interval})")
            break
    if args.save is not None and saved < reached:  # the end, or an --exit-interval stop
        save(reached)
    logger.close()
    destroy_distributed()
    return losses


def _batch_encoder(cfg, recipe, vae, text_encoders, image_encoder, device, dtype, seed: int, first_batch: int = 0):
    """batch -> {latents, context, context_mask, condition, context_image, skipped}: the frozen encoders
    (``context`` / ``context_mask``: one embedding and mask per text encoder, in order),
    with VAE-CP (``ae.vae_cp_size``) and encoder-DP (``enable_encoder_dp``) when the model JSON asks for
    them; the recipe encodes its condition. ``seeds`` (one per sample, from the run seed, the number of
    batches this rank encoded since the run began, resumes included, and the sample's file) drive random
    conditions such as Open-Sora-Plan's masks."""
    vae_cp = (get_group("vae_cp"), get_group_ranks("vae_cp")) if cfg.sizes.vae_cp_size > 1 else None
    group = get_encoder_dp_group() if cfg.model.enable_encoder_dp else None

    def encode_video(video):
        return vae.normalize(vae.encode(video, vae_cp=vae_cp)[0])


    def encode_dp(fn, *tensors):
        return encode_data_parallel(fn, *tensors, group=group)

    encoded = {"batches": first_batch}

    @torch.no_grad()
    def encode(batch):
        video = batch["video"].to(device, dtype, non_blocking=True)
        tokens = [(batch[ids_key].to(device, non_blocking=True), batch[mask_key].to(device, non_blocking=True))
                  for ids_key, mask_key in token_keys(len(text_encoders))]
        batch = dict(batch, seeds=torch.tensor(
            [((seed * 1_000_003 + encoded["batches"]) * 1_000_003 + zlib.crc32(path.encode())) % (1 << 62)
             for path in batch["path"]], dtype=torch.int64))
        encoded["batches"] += 1
        condition, context_image = recipe.encode_condition(vae, batch, video, vae_cp, image_encoder, encode_dp, dtype)
        contexts = [encode_dp(lambda i, m, enc=encoder: enc.encode(i, m).to(dtype), ids, mask)
                    for encoder, (ids, mask) in zip(text_encoders, tokens)]
        return {"latents": encode_dp(encode_video, video), "context": contexts,
                "context_mask": [mask for _, mask in tokens], "skipped": batch["skipped"], "condition": condition,
                "context_image": context_image}

    return encode
