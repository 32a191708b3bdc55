"""Checks of flags, model JSON and data JSON together, before any process group or tensor exists.

Every rule reports the flag or key, the value given and what would be valid; all problems of a
configuration are reported at once.
"""

from __future__ import annotations

import argparse
import os

from mm.accelerator.attention_kernels import flash3_problem, kernels_for
from mm.accelerator.device import BACKENDS, backend_accepted
from mm.arguments.json_configs import DataConfig, ModelConfig
from mm.arguments.pipeline_layout import pipeline_layers_problems
from mm.parallel.groups import ParallelSizes

MODES = ("train", "inference", "vae", "features")  # vae: pretrain_vae.py; features: extract_features.py
TRAINING_MODES = ("train", "vae")
# pretrain_vae.py's flags when not given, and the VAEs it trains (ae.model_id)
VAE_DEFAULTS = {"vae_reconstruction_loss": "l1", "vae_kl_weight": 1e-6, "vae_latent_stats_samples": 64}
TRAINABLE_AES = ("wan_vae",)


def ulysses_degree(args: argparse.Namespace) -> int:
    """How many ranks split attention heads: all of CP for Ulysses, part of it for hybrid."""
    if args.context_parallel_algo == "ulysses_cp_algo":
        return args.context_parallel_size
    if args.context_parallel_algo == "hybrid_cp_algo":
        return args.ulysses_degree_in_cp or 1
    return 1


def virtual_pipeline_size(args: argparse.Namespace) -> int | None:
    """VPP chunks, or None without interleaving (MindSpeed scripts pass VP=1 for 'off')."""
    vpp = args.virtual_pipeline_model_parallel_size
    return None if vpp in (None, 1) else vpp


def parallel_sizes(args: argparse.Namespace, model: ModelConfig | None, world_size: int) -> ParallelSizes:
    return ParallelSizes(
        world_size=world_size,
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        context_parallel=args.context_parallel_size,
        ulysses_degree=ulysses_degree(args),
        cp_window_size=args.cp_window_size,
        vae_cp_size=model.ae.vae_cp_size if model is not None and model.ae is not None else 1,
    )


def _check_parallel(args: argparse.Namespace, world_size: int, problems: list[str]) -> None:
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if world_size % (tp * pp * cp) != 0:
        problems.append(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp}) = {tp * pp * cp}; "
            "change the sizes or the number of processes (GPUS_PER_NODE x NNODES)"
        )
    if args.sequence_parallel and tp == 1:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1 (got 1); drop the flag or raise TP")
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp is not None and vpp > 1 and pp == 1:
        problems.append(
            f"--virtual-pipeline-model-parallel-size {vpp} needs --pipeline-model-parallel-size > 1 (got 1)"
        )
    algo = args.context_parallel_algo
    if algo == "hybrid_cp_algo":
        u = args.ulysses_degree_in_cp
        if u is None:
            problems.append("--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp (a divisor of CP, > 1)")
        elif u <= 1 or cp % u != 0 or u == cp:
            problems.append(
                f"--ulysses-degree-in-cp {u} with --context-parallel-size {cp}: hybrid_cp_algo needs a "
                f"degree > 1 that divides CP and is smaller than CP (valid: "
                f"{[d for d in range(2, cp) if cp % d == 0] or 'none for this CP; use ulysses_cp_algo or megatron_cp_algo'})"
            )
    elif args.ulysses_degree_in_cp not in (None, 1) and algo != "hybrid_cp_algo":
        problems.append(
            f"--ulysses-degree-in-cp {args.ulysses_degree_in_cp} is only used with --context-parallel-algo "
            f"hybrid_cp_algo (got {algo})"
        )
    w = args.cp_window_size
    if w > 1:
        ring = cp // ulysses_degree(args) if algo == "hybrid_cp_algo" else cp
        if algo == "ulysses_cp_algo":
            problems.append(
                f"--cp-window-size {w} (double ring) needs --context-parallel-algo megatron_cp_algo or "
                "hybrid_cp_algo (got ulysses_cp_algo)"
            )
        elif cp % w != 0 or ring % w != 0:
            problems.append(
                f"--cp-window-size {w} must divide the ring size ({ring} = --context-parallel-size {cp}"
                + (f" / --ulysses-degree-in-cp {args.ulysses_degree_in_cp}" if algo == "hybrid_cp_algo" else "")
                + f"); valid: {[d for d in range(1, ring + 1) if ring % d == 0]}"
            )
    if args.attention_mask_type != "general":
        problems.append(
            f"--attention-mask-type {args.attention_mask_type}: DiT attention is bidirectional; valid: general"
        )


def _check_precision_and_recompute(args: argparse.Namespace, problems: list[str]) -> None:
    if args.bf16 and args.fp16:
        problems.append("--bf16 and --fp16 are mutually exclusive; pass one")
    if args.recompute_method is not None and args.recompute_granularity != "full":
        problems.append(
            f"--recompute-method {args.recompute_method} needs --recompute-granularity full "
            f"(got {args.recompute_granularity})"
        )
    if args.recompute_granularity == "full" and (args.recompute_method is None or args.recompute_num_layers is None):
        problems.append(
            "--recompute-granularity full needs --recompute-method (uniform or block) and --recompute-num-layers"
        )
    if args.recompute_modules is not None:
        if args.recompute_granularity != "selective" and not (args.recompute_granularity == "full"
                                                               and args.recompute_method == "block"):
            problems.append(f"--recompute-modules {' '.join(args.recompute_modules)} needs --recompute-granularity "
                            f"selective, or full with --recompute-method block (the modules are then recomputed in "
                            f"the layers after the first --recompute-num-layers); got --recompute-granularity "
                            f"{args.recompute_granularity} --recompute-method {args.recompute_method}")
        elif args.recompute_granularity == "full" and args.recompute_modules == ["core_attn"]:
            # megatron-core's default recompute_modules, which it ignores under full
            problems.append("--recompute-modules core_attn with --recompute-granularity full --recompute-method block: "
                            "core_attn alone is megatron-core's default, ignored under full; add mlp or layernorm "
                            "for the layers after the first --recompute-num-layers, or use --recompute-granularity "
                            "selective")
        if "layernorm" in args.recompute_modules and args.context_parallel_size > 1:
            # the CP attention's sends, receives and all-to-alls would run again in the recompute
            problems.append(f"--recompute-modules layernorm is for runs without context parallelism (got "
                            f"--context-parallel-size {args.context_parallel_size}); use core_attn and/or mlp")
    if args.compile_dit_blocks and (args.tensor_model_parallel_size > 1 or args.context_parallel_size > 1):
        # their collectives break a compiled layer's graph; a graph break inside a layer failed in the
        # backward on torch 2.11 (a parameter gradient of the wrong shape), so these are not offered yet
        problems.append(
            f"--compile-dit-blocks is for runs without tensor or context parallelism (got "
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}, --context-parallel-size "
            f"{args.context_parallel_size}); drop one or the other")


def _check_batch(args: argparse.Namespace, world_size: int, mode: str, problems: list[str]) -> None:
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world_size % model_parallel != 0:
        return  # reported by _check_parallel
    dp = world_size // model_parallel
    gbs, mbs = args.global_batch_size, args.micro_batch_size
    if gbs is not None and gbs % (mbs * dp) != 0:
        problems.append(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size ({mbs}) x data-parallel size "
            f"({dp} = world {world_size} / (TP x PP x CP)); valid: multiples of {mbs * dp}"
        )
    vpp, pp = virtual_pipeline_size(args), args.pipeline_model_parallel_size
    micro = (gbs or mbs * dp) // (mbs * dp)
    if mode in TRAINING_MODES and vpp is not None and pp > 1 and micro < pp:
        # megatron-core's interleaved schedule runs groups of PP micro-batches per virtual stage
        problems.append(
            f"--virtual-pipeline-model-parallel-size {vpp} with {micro} micro-batch(es) per iteration (--global-batch-size "
            f"{gbs or mbs * dp} / (--micro-batch-size {mbs} x data-parallel size {dp})): interleaving needs at least "
            f"--pipeline-model-parallel-size ({pp}) micro-batches; valid: --global-batch-size >= {pp * mbs * dp}"
        )
    if mode in TRAINING_MODES:
        if args.train_iters is None:
            problems.append("--train-iters is required for training")
        if args.lr is None:
            problems.append("--lr is required for training")
        if args.train_iters is not None:  # megatron's OptimizerParamScheduler asserts warmup < decay
            decay = args.lr_decay_iters or args.train_iters
            if args.lr_warmup_fraction is None:
                warmup, given = args.lr_warmup_iters, f"--lr-warmup-iters {args.lr_warmup_iters}"
            else:
                warmup = int(args.lr_warmup_fraction * args.train_iters)
                given = f"--lr-warmup-fraction {args.lr_warmup_fraction} x --train-iters {args.train_iters} = {warmup}"
            if warmup >= decay:
                source = "--lr-decay-iters" if args.lr_decay_iters else "--train-iters"
                problems.append(f"{given} warm-up iterations, not fewer than the {decay} of the LR schedule ({source} "
                                f"{decay}); valid: a warm-up below {decay}")
        if args.save_interval is not None and args.save is None:
            problems.append(f"--save-interval {args.save_interval} needs --save (a checkpoint directory)")
        if args.keep_last_checkpoints is not None and args.save is None:
            problems.append(f"--keep-last-checkpoints {args.keep_last_checkpoints} needs --save (the checkpoint "
                            "directory it prunes)")
        if args.load_fallback and args.load is None:
            problems.append("--load-fallback needs --load (the checkpoint directory to fall back in)")
    if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
        problems.append(f"--ema-decay {args.ema_decay}; valid: 0 < decay < 1 (e.g. 0.9999)")
    lo, hi = args.min_timestep_boundary, args.max_timestep_boundary
    for flag, value in (("--min-timestep-boundary", lo), ("--max-timestep-boundary", hi)):
        if value is not None and not 0.0 <= value <= 1.0:
            problems.append(f"{flag} {value}: a fraction of the timestep schedule; valid: 0 to 1")
    if lo is not None and hi is not None and lo >= hi:
        problems.append(f"--min-timestep-boundary {lo} must be below --max-timestep-boundary {hi} (the expert's "
                        "range of timesteps, e.g. 0.9 to 1.0 for Wan2.2 I2V-A14B's high-noise expert)")


def _check_model(args: argparse.Namespace, model: ModelConfig, problems: list[str]) -> None:
    pred = model.predictor
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    u = ulysses_degree(args)
    if pred.num_heads is not None and pred.num_heads % (tp * u) != 0:
        heads = pred.num_heads
        problems.append(
            f"predictor.num_heads = {heads} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"Ulysses degree ({u}, from --context-parallel-algo {args.context_parallel_algo}"
            + (" and --ulysses-degree-in-cp" if args.context_parallel_algo == "hybrid_cp_algo" else
               " and --context-parallel-size" if args.context_parallel_algo == "ulysses_cp_algo" else "")
            + f") = {tp * u}; valid: TP x Ulysses degree among the divisors of {heads} "
            f"({', '.join(str(d) for d in range(1, heads + 1) if heads % d == 0)}); ring attention "
            "(--context-parallel-algo megatron_cp_algo) splits no heads"
        )
    _check_pipeline_num_layers(args, pred.pipeline_num_layers, pred.num_layers, problems)
    vae_cp = model.ae.vae_cp_size if model.ae is not None else 1
    if vae_cp < 1:
        problems.append(f"ae.vae_cp_size = {vae_cp}; valid: an integer >= 1")
    elif vae_cp > 1:
        if pp > 1:
            problems.append(
                f"ae.vae_cp_size = {vae_cp} (VAE-CP) does not work with pipeline parallelism "
                f"(--pipeline-model-parallel-size {pp}); set vae_cp_size to 1 or PP to 1"
            )
        tpcp = tp * args.context_parallel_size
        if tpcp % vae_cp != 0:
            problems.append(
                f"ae.vae_cp_size = {vae_cp} must divide TP x CP = {tpcp} (the ranks that hold the same video); "
                f"valid: {[d for d in range(1, tpcp + 1) if tpcp % d == 0]}"
            )
    if model.enable_encoder_dp:
        if pp > 1:
            problems.append(
                f"enable_encoder_dp = true does not work with pipeline parallelism (--pipeline-model-parallel-size {pp})"
            )
        if vae_cp > 1:
            problems.append(f"enable_encoder_dp = true does not work with VAE-CP (ae.vae_cp_size = {vae_cp})")
    if model.encoder_offload_interval < 1:
        problems.append(f"encoder_offload_interval = {model.encoder_offload_interval}; valid: an integer >= 1")


def _check_dynamic_dpcp(args: argparse.Namespace, model: ModelConfig, world_size: int, problems: list[str]) -> None:
    """use_dynamic_dpcp = true (mm.parallel.dynamic_cp): what the layouts [DP x CP / c, c] need."""
    cp = model.max_cp_size
    if not model.use_dynamic_dpcp or cp is None or cp < 1 or cp & (cp - 1):
        return  # not asked for, or max_cp_size reported by the JSON's reader
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    key = "use_dynamic_dpcp = true"
    if args.context_parallel_algo != "ulysses_cp_algo":
        problems.append(f"{key} with --context-parallel-algo {args.context_parallel_algo}: the CP degree chosen per "
                        "iteration splits attention heads (Ulysses), as in MindSpeed-MM; valid: ulysses_cp_algo")
    for flag, value in (("--pipeline-model-parallel-size", pp), ("--tensor-model-parallel-size", tp)):
        if value > 1:
            problems.append(f"{key} with {flag} {value}: dynamic DP/CP re-lays out the data-parallel x context-"
                            f"parallel ranks of a run without model parallelism; valid: {flag} 1")
    if model.enable_encoder_dp:
        problems.append(f"{key} with enable_encoder_dp = true: each rank encodes its own samples before the CP "
                        "degree is chosen (as MindSpeed-MM, which refuses encoder DP here); valid: enable_encoder_dp false")
    vae_cp = model.ae.vae_cp_size if model.ae is not None else 1
    if vae_cp > 1:
        problems.append(f"{key} with ae.vae_cp_size = {vae_cp}: each rank encodes its own samples; valid: "
                        "vae_cp_size 1")
    if world_size % (tp * pp) != 0:
        return
    dpcp = world_size // (tp * pp)
    if dpcp % cp != 0:
        problems.append(f"max_cp_size = {cp} does not divide the {dpcp} data-parallel x context-parallel ranks "
                        f"(world {world_size} / (TP x PP)); valid: "
                        f"{', '.join(str(1 << p) for p in range(dpcp.bit_length()) if dpcp % (1 << p) == 0)}")
    heads = model.predictor.num_heads if model.predictor is not None else None
    if heads is not None and heads % (tp * cp) != 0:
        problems.append(f"max_cp_size = {cp}: predictor.num_heads = {heads} is not divisible by TP ({tp}) x "
                        f"max_cp_size = {tp * cp} (Ulysses splits the heads over the CP ranks); valid: a power "
                        f"of 2 dividing {heads // tp if heads % tp == 0 else heads} and {dpcp}")
    gbs, mbs = args.global_batch_size, args.micro_batch_size
    if gbs is not None and gbs % (mbs * dpcp) != 0:
        problems.append(f"{key}: every data-parallel x context-parallel rank reads its own micro-batches; "
                        f"--global-batch-size {gbs} is not divisible by --micro-batch-size ({mbs}) x {dpcp}; valid: "
                        f"multiples of {mbs * dpcp}")


def _check_text_encoder_fsdp(args: argparse.Namespace, model: ModelConfig, world_size: int,
                             problems: list[str]) -> None:
    """``text_encoder_fsdp`` (training): every rank of pipeline stage 0 must call each text encoder's
    forward the same number of times, since the sharded parameters are all-gathered over them."""
    if not model.text_encoder_fsdp:
        return
    key = "text_encoder_fsdp = true"
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if not model.text_encoder:
        problems.append(f"{key} shards the text encoders, but the model JSON has no text_encoder section; "
                        "set text_encoder_fsdp to false")
    stage0 = world_size // pp if world_size % pp == 0 else 0
    if stage0 == 1:
        problems.append(f"{key} shards the text encoders over the ranks of pipeline stage 0 (world size {world_size} / "
                        f"--pipeline-model-parallel-size {pp} = 1 rank here): it needs 2 or more; valid: "
                        "world size / PP > 1, or text_encoder_fsdp false")
    if model.encoder_offload_interval > 1:
        problems.append(f"{key} does not work with encoder_offload_interval = {model.encoder_offload_interval}: the "
                        "offload moves each encoder whole between host and device, text_encoder_fsdp keeps a shard "
                        "on every stage-0 rank; use one or the other (encoder_offload_interval 1, or "
                        "text_encoder_fsdp false)")
    mbs = args.micro_batch_size
    if model.enable_encoder_dp and mbs < tp * cp:
        problems.append(f"{key} with enable_encoder_dp = true needs --micro-batch-size ({mbs}) >= TP x CP "
                        f"({tp * cp}): encoder-DP splits each micro-batch over the TP x CP ranks, and a rank left "
                        "without a sample would skip the encoder call that its peers' sharded encoder waits on; "
                        f"valid: --micro-batch-size >= {tp * cp}, enable_encoder_dp false, or text_encoder_fsdp "
                        "false")


def _check_pipeline_num_layers(args: argparse.Namespace, layout: list | None, num_layers: int | None,
                               problems: list[str]) -> None:
    pp = args.pipeline_model_parallel_size
    if layout is None:
        if pp > 1:
            problems.append(
                f"--pipeline-model-parallel-size {pp} needs predictor.pipeline_num_layers in the model JSON: the DiT "
                f"layers per stage, e.g. {[num_layers // pp] * pp if num_layers and num_layers % pp == 0 else [8] * pp}"
            )
        return
    problems.extend(pipeline_layers_problems(layout, num_layers, pp, virtual_pipeline_size(args)))


def _check_vae(args: argparse.Namespace, model: ModelConfig | None, data: DataConfig | None, mode: str,
               problems: list[str]) -> None:
    """pretrain_vae.py: data-parallel training of the model JSON's ``ae`` on the data JSON's videos; its
    flags get their defaults here. Other entry points refuse the VAE flags."""
    flags = [name for name in VAE_DEFAULTS if getattr(args, name) is not None]
    if mode != "vae":
        problems.extend(f"--{name.replace('_', '-')} is a flag of pretrain_vae.py (VAE training); drop it here"
                        for name in flags)
        return
    for name, value in VAE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.vae_kl_weight >= 0.0 or args.vae_kl_weight == float("inf"):
        problems.append(f"--vae-kl-weight {args.vae_kl_weight}; valid: a number >= 0 (e.g. 1e-6)")
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                        ("--context-parallel-size", args.context_parallel_size)):
        if value != 1:
            problems.append(f"{flag} {value}: pretrain_vae.py trains data-parallel only; valid: 1 (leave it out)")
    for flag, given in (("--bf16", args.bf16), ("--fp16", args.fp16), ("--load", args.load is not None),
                        ("--save-interval", args.save_interval is not None),
                        ("--use-distributed-optimizer", args.use_distributed_optimizer)):
        if given:
            why = "start from weights with the model JSON's ae.from_pretrained" if flag == "--load" else \
                "it saves the VAE once, at the end" if flag == "--save-interval" else \
                "VAE training runs in fp32" if flag in ("--bf16", "--fp16") else "the optimizer is torch's AdamW"
            problems.append(f"{flag} is not supported by pretrain_vae.py ({why}); drop it")
    if args.optimizer != "adam":
        problems.append(f"--optimizer {args.optimizer}: pretrain_vae.py uses AdamW; valid: adam")
    if args.train_iters is not None and args.lr_warmup_fraction is None and args.lr_warmup_iters >= args.train_iters:
        problems.append(f"--lr-warmup-iters {args.lr_warmup_iters} with --train-iters {args.train_iters}: the warm-up "
                        f"must end before the last iteration; valid: 0 to {args.train_iters - 1}")
    if model is None:
        return
    ae = model.ae
    if ae is None:
        problems.append(f"--mm-model {model.path}: pretrain_vae.py trains the model JSON's ae section, and there is "
                        "none; add one (ae.model_id, ae.from_pretrained or the VAE's config keys)")
        return
    if ae.model_id not in TRAINABLE_AES:
        problems.append(f"ae.model_id = {ae.model_id!r}: pretrain_vae.py trains {', '.join(TRAINABLE_AES)}")
    if ae.vae_cp_size != 1:
        problems.append(f"ae.vae_cp_size = {ae.vae_cp_size}: pretrain_vae.py encodes each video on one rank; valid: 1")
    if ae.dtype not in (None, "fp32"):
        problems.append(f"ae.dtype = {ae.dtype!r}: pretrain_vae.py trains in fp32; valid: fp32 (or leave it out)")


LORA_FLAGS = (("--lora-alpha", "lora_alpha"), ("--lora-target-modules", "lora_target_modules"),
              ("--lora-load", "lora_load"), ("--lora-register-forward-hook", "lora_register_forward_hook"))


def _check_lora(args: argparse.Namespace, mode: str, problems: list[str]) -> None:
    """--lora-*: LoRA fine-tuning of the DiT (the target names are the family's: ``FamilySpec.lora_settings``)."""
    given = [flag for flag, name in LORA_FLAGS if getattr(args, name) is not None]
    if args.lora_dropout:
        given.append("--lora-dropout")
    if args.lora_r is None:
        problems.extend(f"{flag} needs --lora-r (the adapters' rank, e.g. 16), which turns LoRA on" for flag in given)
        return
    if mode != "train":
        problems.append(f"--lora-r {args.lora_r} trains adapters (pretrain_t2v.py, pretrain_i2v.py); to sample with an "
                        "adapter, name it in the model JSON's inference section: \"lora\": {\"path\": ..., \"scale\": 1.0}")
        return
    alpha = args.lora_alpha
    if alpha is not None and not (0.0 < alpha < float("inf")):
        problems.append(f"--lora-alpha {alpha}; valid: a number > 0 (the adapters' scale is alpha / r; e.g. the rank)")
    if not 0.0 <= args.lora_dropout < 1.0:
        problems.append(f"--lora-dropout {args.lora_dropout}; valid: 0 <= dropout < 1")
    redrawn = sorted(set(args.recompute_modules or ()) & {"mlp", "layernorm"})
    if args.lora_dropout and redrawn:
        # these regions run again in the backward without restoring the RNG: the adapters' dropout masks would differ
        problems.append(f"--lora-dropout {args.lora_dropout} with --recompute-modules {' '.join(redrawn)}: the recompute "
                        "would draw other dropout masks than the forward; use --lora-dropout 0, or core_attn / full "
                        "recompute (which restore the RNG)")
    if args.ema_decay is not None:
        problems.append(f"--ema-decay {args.ema_decay} with --lora-r {args.lora_r}: the EMA averages the DiT's weights, a "
                        "LoRA run trains and saves its adapters alone; drop one of the two")
    if args.load is not None and args.save is not None and os.path.realpath(args.load) == os.path.realpath(args.save):
        problems.append(f"--load {args.load} is --save's directory: with --lora-r, --load is the base model (a converted "
                        "release or a full checkpoint) and the adapters resume with --lora-load (the same directory "
                        "as --save)")
    if args.lora_load is not None:
        load = args.lora_load
        resumable = args.save is not None and os.path.realpath(args.save) == os.path.realpath(load)
        if not resumable and not os.path.isfile(os.path.join(load, "latest_checkpointed_iteration.txt")) and \
                not (os.path.isdir(load) and any(name.startswith("iter_") for name in os.listdir(load))):
            problems.append(f"--lora-load {args.lora_load}: no adapter checkpoint there (no "
                            "latest_checkpointed_iteration.txt); give a LoRA run's --save directory, or the same "
                            "directory as --save to start a resumable run")


def lora_notes(args: argparse.Namespace) -> list[str]:
    """What the user should know about the LoRA flags that is not an error."""
    if args.lora_r is None or args.lora_register_forward_hook is None:
        return []
    return [f"--lora-register-forward-hook {' '.join(args.lora_register_forward_hook)}: mm needs no hook; with frozen "
            "embeddings, the input of the first layer a full recompute checkpoints is made to need gradients itself, "
            "so the recompute reaches the adapters"]


def _check_extraction(args: argparse.Namespace, model: ModelConfig | None, data: DataConfig | None,
                      problems: list[str]) -> None:
    """extract_features.py: every rank encodes its share of the samples alone (data-parallel only)."""
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                        ("--context-parallel-size", args.context_parallel_size)):
        if value != 1:
            problems.append(f"{flag} {value}: extract_features.py shares the samples over all ranks, each encoding "
                            "alone; valid: 1 (leave it out)")
    if model is not None:
        if model.ae is not None and model.ae.vae_cp_size != 1:
            problems.append(f"ae.vae_cp_size = {model.ae.vae_cp_size}: extract_features.py encodes each video on one "
                            "rank; valid: 1 (the ranks share the samples instead)")
        if model.enable_encoder_dp:
            problems.append("enable_encoder_dp = true: extract_features.py shares the samples over the ranks "
                            "already; valid: false")
        if model.ae is None or not model.text_encoder:
            problems.append(f"--mm-model {model.path}: extract_features.py encodes with the model JSON's ae and "
                            "text_encoder sections; give both")
    if data is not None and data.features:
        problems.append("dataset_param.dataset_type = 'feature': extract_features.py reads videos; valid: the "
                        "videos' data JSON (the one the features are extracted from)")


def validate(args: argparse.Namespace, model: ModelConfig | None, data: DataConfig | None, world_size: int,
             mode: str = "train", accelerator: str | None = None) -> list[str]:
    """All problems of this configuration (empty when it is valid)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; valid: {MODES}")
    problems: list[str] = []
    _check_parallel(args, world_size, problems)
    _check_precision_and_recompute(args, problems)
    _check_batch(args, world_size, mode, problems)
    _check_vae(args, model, data, mode, problems)
    _check_lora(args, mode, problems)
    if mode == "features":
        _check_extraction(args, model, data, problems)
    elif args.save_features is not None:
        problems.append("--save-features is a flag of extract_features.py (feature extraction); drop it here")
    if model is not None and mode != "vae":
        _check_model(args, model, problems)
        if mode == "train":  # inference shards the text encoder with inference.t5_fsdp
            _check_text_encoder_fsdp(args, model, world_size, problems)
            _check_dynamic_dpcp(args, model, world_size, problems)
    if mode == "vae" and data is None:
        problems.append("--mm-data is required for VAE training (a data JSON with dataset_param.basic_parameters.data_path)")
    if mode in ("train", "features") and data is None:
        problems.append("--mm-data is required for training (a data JSON with dataset_param.basic_parameters.data_path)")
    if accelerator is not None and args.attention_kernel != "auto":
        if args.attention_kernel not in kernels_for(accelerator):
            why = f" ({flash3_problem()})" if args.attention_kernel == "flash3" else ""
            problems.append(f"--attention-kernel {args.attention_kernel} is not available on {accelerator!r}{why}; "
                            f"valid: auto, {', '.join(kernels_for(accelerator))}")
    backend = args.distributed_backend
    if backend is not None and accelerator is not None and not backend_accepted(accelerator, backend):
        problems.append(
            f"--distributed-backend {backend} does not match the accelerator {accelerator!r}; valid: "
            f"{BACKENDS[accelerator]} (or leave the flag out)"
        )
    return problems
