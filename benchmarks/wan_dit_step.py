"""A Wan DiT at video scale, mm vs diffusers in the same process: one bf16 training step
(forward+backward) or one inference forward (no grad). mm's variants also run the other families'
DiTs (``--model`` an Open-Sora-Plan 1.3 model JSON; no diffusers baseline there).

    python benchmarks/wan_dit_step.py --model examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json \
        --latent 21 60 104 --text-len 512 --repeats 3 [--mode infer] [--variants mm+compile:mlp diffusers:ckpt]
        [--variants mm+compile:none@cudnn mm+compile:none@flash3]

Random weights (no download), random latents/context, loss = mean of the output. Each variant is
``IMPL[+compile][:RECOMPUTE]``: IMPL ``mm`` or ``diffusers``; ``+compile`` compiles each DiT block
(mm: ``WanDiT.compile_blocks``, what ``--compile-dit-blocks`` does; diffusers:
``compile_repeated_blocks``); RECOMPUTE for mm ``none``, ``full`` (uniform, 1 layer), ``blockN``
(full recompute of the first N layers; ``blockN+MODULES``: those modules selectively in the other
layers), ``core_attn``, ``mlp``, ``layernorm`` or several joined by ``+`` (selective, ``--recompute-modules``), for diffusers ``none`` or ``ckpt`` (gradient checkpointing of every
block); an mm variant may end in ``@KERNEL``, its --attention-kernel (default auto), and ``+loraR`` makes
it LoRA fine-tuning of rank R (what ``--lora-r R`` does: the DiT frozen, adapters on the linears of
``--lora-target-modules``, by default MindSpeed-MM's set; e.g. ``mm+lora16:block30`` against ``mm:block30``,
full fine-tuning, with ``--optimizer``). ``--optimizer``
makes each training step a whole one: mm's model in megatron-core's DDP
(fp32 gradient buffers) with megatron's optimizer, built by the function ``pretrain_t2v.py`` uses
(``mm.training.pretrain.wrap_for_training``: Adam, --clip-grad 1.0, bf16 with fp32 main params),
gradients finalized as megatron's schedules do; diffusers with torch's fused AdamW and
``clip_grad_norm_(1.0)``. Prints per variant: median seconds per step (training) or per forward (inference; a CFG
sampling step is two), peak GPU memory, model TFLOP/s from the per-layer formula of
docs/benchmarks.md (x3 for forward+backward, recomputation not counted) and MFU = TFLOP/s over the
GPU's dense bf16 peak (--peak-tflops; 989 for H100/H200). An implementation that runs out of memory
is reported as OOM (also where the allocation failed inside a collective, e.g. NCCL's "Failed to CUDA
calloc"). Each variant runs in a process of its own (this script again, with ``--in-process``), so
one variant's OOM or crash leaves the next one a clean GPU; a variant whose process dies is reported
with its exit status. ``--profile DIR`` also records one step of each variant with torch.profiler and
writes its top GPU kernels (DIR/<variant>.txt) and a summary by kernel class.
"""

from __future__ import annotations

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core/diffusers are imported: their known notices (MM_VERBOSE=1 shows them)

import argparse
import collections
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from mm.accelerator import init_distributed, select_accelerator
from mm.accelerator.attention_kernels import KERNEL_CHOICES
from mm.arguments.flags import parse_flags
from mm.families import build_predictor, family_for, predictor_config
from mm.models.predictor.lora import add_adapters
from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
from mm.training.pretrain import wrap_for_training

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM datasheets
DEFAULT_TRAIN = ["mm:full", "mm+compile:none", "mm+compile:mlp", "diffusers:ckpt"]
DEFAULT_INFER = ["mm:none", "mm+compile:none", "diffusers:none"]
LORA_TARGETS = ["ffn.2", "ffn.0", "proj_q", "proj_k", "proj_v", "proj_out"]  # MindSpeed-MM's finetune_lora.sh


# how an out-of-memory reads where it is not torch.OutOfMemoryError: inside NCCL's collectives, cuBLAS
OOM_MESSAGES = ("out of memory", "failed to cuda calloc", "failed to cuda malloc", "cublas_status_alloc_failed")


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is the GPU running out of memory, whoever raised it."""
    return isinstance(error, torch.OutOfMemoryError) or any(m in str(error).lower() for m in OOM_MESSAGES)


def run_isolated(argv: list[str], variants: list[str]) -> tuple[list[tuple], list[str], str]:
    """Each variant in a process of its own (this script with ``--in-process``): its table row and
    profile text, or a row saying how its process ended; and the table's header."""
    rows, profiles, header = [], [], "(no variant ran)"
    for variant in variants:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, __file__, *argv, "--variants", variant, "--in-process", "--row-file", str(out)]
            done = subprocess.run(cmd, text=True, stdout=sys.stdout, stderr=subprocess.PIPE)
            sys.stderr.write(done.stderr)
            if out.is_file():
                result = json.loads(out.read_text())
                rows.extend(tuple(r) for r in result["rows"])
                profiles.extend(result["profiles"])
                header = result["header"]
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                status = "OOM" if any(m in done.stderr.lower() for m in OOM_MESSAGES) else f"exit {done.returncode}"
                rows.append((variant, status, "-", "-", "-"))
                print(f"{variant}: its process ended with exit status {done.returncode}: {tail}", file=sys.stderr)
    return rows, profiles, header


def _argv_without_variants(argv: list[str]) -> list[str]:
    out, skipping = [], False
    for a in argv:
        if a == "--variants":
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def model_flops(arch, tokens: int, text_len: int) -> float:
    """Forward FLOPs of all layers (matmuls only): self-attn projections and scores, cross-attn, FFN."""
    n, length, d, f = tokens, text_len, arch.hidden_size, arch.ffn_dim
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * length * d * d + 4 * n * length * d + 4 * n * d * f
    return per_layer * arch.num_layers


def parse_variant(spec: str) -> tuple[str, bool, str, str, int | None]:
    spec, _, kernel = spec.partition("@")
    kernel = kernel or "auto"
    impl, _, recompute = spec.partition(":")
    impl, *modifiers = impl.split("+")
    recompute = recompute or "none"
    compiled = "compile" in modifiers
    ranks = [int(m[4:]) for m in modifiers if re.fullmatch(r"lora[1-9]\d*", m)]
    lora = ranks[0] if ranks else None
    if impl not in ("mm", "diffusers") or len(modifiers) != compiled + len(ranks) or len(ranks) > 1 or \
            (lora is not None and impl != "mm"):
        raise SystemExit(f"variant {spec!r}: IMPL[+compile][+loraR][:RECOMPUTE][@KERNEL] with IMPL mm or diffusers "
                         "(+loraR: mm's LoRA of rank R)")
    if kernel not in KERNEL_CHOICES or (impl == "diffusers" and kernel != "auto"):
        raise SystemExit(f"variant {spec!r}: @{kernel}; valid for mm: {', '.join(KERNEL_CHOICES)} (diffusers: none)")
    modules = ("core_attn", "mlp", "layernorm")
    valid = (("none", "full", *modules) if impl == "mm" else ("none", "ckpt"))
    parts = recompute.split("+")
    block = re.fullmatch(r"block\d+", parts[0]) is not None
    selective = impl == "mm" and set(parts[block:]) <= set(modules)
    if recompute not in valid and not selective:
        raise SystemExit(f"variant {spec!r}: recompute {recompute!r}; valid for {impl}: {', '.join(valid)}"
                         + (", blockN, several of core_attn/mlp/layernorm joined by + (after blockN: in the "
                            "other layers)" if impl == "mm" else ""))
    return impl, compiled, recompute, kernel, lora


def mm_recompute(recompute: str) -> dict:
    if recompute == "none":
        return {}
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if recompute.startswith("block"):  # blockN[+modules]: the modules in the layers after the first N
        block, *modules = recompute.split("+")
        return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=int(block[5:]),
                    recompute_modules=modules)
    return dict(recompute_granularity="selective", recompute_modules=recompute.split("+"))


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "attention", "sdpa", "cudnn_generated")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "gemv", "cublas", "sm90_")):
        return "matmul"
    if n.startswith("triton"):
        return "compiled (triton)"
    if any(k in n for k in ("norm", "reduce", "welford")):
        return "norm / reduction"
    if any(k in n for k in ("copy", "cat", "memcpy", "memset", "transpose", "fill")):
        return "copy / layout"
    return "other elementwise"


def profile_step(step, name: str, out_dir: Path, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        # kernels only: the profiler also puts user annotations (Optimizer.step#...) on the GPU timeline
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            k = per_kernel[e.name]
            k[0] += e.time_range.elapsed_us()
            k[1] += 1
    total = sum(v[0] for v in per_kernel.values())
    classes = collections.defaultdict(float)
    for kname, (us, _) in per_kernel.items():
        classes[kernel_class(kname)] += us
    lines = [f"# {name}: wall {wall * 1e3:.1f} ms (profiled), GPU kernel time {total / 1e3:.1f} ms, "
             f"{sum(v[1] for v in per_kernel.values())} kernel launches", "", "| class | ms | % of kernel time |",
             "| --- | --- | --- |"]
    for cls, us in sorted(classes.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cls} | {us / 1e3:.1f} | {100 * us / total:.1f} |")
    lines += ["", "| kernel | calls | ms | % |", "| --- | --- | --- | --- |"]
    for kname, (us, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:rows]:
        short = kname if len(kname) <= 160 else kname[:157] + "..."
        lines.append(f"| `{short}` | {calls} | {us / 1e3:.2f} | {100 * us / total:.1f} |")
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".txt")).write_text(text + "\n")
    return text


def _time(step, repeats: int, warmups: int) -> tuple[float, float]:
    torch.cuda.synchronize()
    for _ in range(warmups):  # compilation, cuDNN plans, allocator
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json")
    parser.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"))
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"default: train {' '.join(DEFAULT_TRAIN)}; infer {' '.join(DEFAULT_INFER)}")
    parser.add_argument("--only", choices=("mm", "diffusers"), default=None, help="keep the variants of one IMPL")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (profiling)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default by GPU name")
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler kernel tables here")
    parser.add_argument("--profile-rows", type=int, default=25, help="kernels listed per profiled variant")
    parser.add_argument("--optimizer", action="store_true",
                        help="training: time the optimizer step too (mm: pretrain's DDP + megatron optimizer)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="cap the caching allocator at this many GiB (torch's per-process memory fraction): "
                             "on a larger card, what fits on a smaller one (78.5 for an 80 GB H100: its 79.2 GiB "
                             "less the CUDA context)")
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of the script itself (tiny --latent/--layers; needs --peak-tflops)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the variants in this process (what each variant's own process is given)")
    parser.add_argument("--lora-target-modules", nargs="+", default=LORA_TARGETS, metavar="NAME",
                        help="+loraR variants: the linears adapted (pretrain_t2v.py's flag; default MindSpeed-MM's "
                             "finetune_lora.sh set)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="+loraR variants: alpha (default R)")
    parser.add_argument("--row-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = args.variants or (DEFAULT_TRAIN if args.mode == "train" else DEFAULT_INFER)
    variants = [v for v in variants if args.only is None or v.split(":")[0].split("+")[0] == args.only]
    specs = [(v, *parse_variant(v)) for v in variants]
    if not args.in_process:
        rows, profiles, header = run_isolated(_argv_without_variants(sys.argv[1:]), variants)
        _report(args, rows, profiles, header + " | each variant in its own process")
        return

    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer import TransformerConfig

    acc = select_accelerator(args.accelerator)
    init_distributed(acc, 10)
    initialize_parallel(ParallelSizes(world_size=1), seed=1234)
    gpu = torch.cuda.get_device_name() if args.accelerator == "cuda" else "cpu"
    if args.memory_limit_gib is not None and args.accelerator == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total))
        gpu += f" (allocator capped at {args.memory_limit_gib} GiB)"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    if peak is None:
        raise SystemExit(f"no dense bf16 peak known for {gpu!r}: pass --peak-tflops")
    pred = json.load(open(args.model))["predictor"]
    model_id = pred["model_id"]
    params = {k: v for k, v in pred.items() if k not in ("model_id", "from_pretrained", "dtype", "num_layers",
                                                         "num_heads", "pipeline_num_layers")}
    arch = predictor_config(model_id, params, args.layers or pred["num_layers"], pred["num_heads"])
    wan = model_id == "wan_dit"
    if not wan and any(impl == "diffusers" for _, impl, *_ in specs):
        raise SystemExit(f"diffusers variants are Wan's (predictor.model_id wan_dit); the model JSON has {model_id!r}")
    f, h, w = args.latent
    tokens = f * h * w // 4
    train = args.mode == "train"
    if wan:
        flops = (3 if train else 1) * model_flops(arch, tokens, args.text_len)
    else:  # the family's count, what pretrain_t2v.py logs (Open-Sora-Plan: all matmuls, sparse attention)
        from mm.families.opensoraplan.flops import opensoraplan_forward_flops

        flops = (3 if train else 1) * sum(opensoraplan_forward_flops(arch, f, h, w, args.text_len).values())
    dev = acc.device()
    in_dim, text_dim = (arch.in_dim, arch.text_dim) if wan else (arch.input_channels, arch.caption_channels)
    latents = torch.randn(1, in_dim, f, h, w, device=dev, dtype=torch.bfloat16)
    context = torch.randn(1, args.text_len, text_dim, device=dev, dtype=torch.bfloat16)
    timestep = torch.tensor([500.0], device=dev)
    rows, profiles = [], []

    def build_mm(compiled: bool, recompute: str, lora: int | None):
        config = TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                                   num_attention_heads=arch.num_heads, params_dtype=torch.bfloat16,
                                   bf16=True, **mm_recompute(recompute))
        # megatron's layers allocate on the GPU; the plain torch parts move like Megatron-LM's model.cuda()
        model = build_predictor(model_id, arch, config).to(dev).train(train)
        if lora is not None:  # what --lora-r does: the DiT frozen, adapters on its layers' linears
            family = family_for(model_id)
            settings = family.lora_settings(SimpleNamespace(lora_r=lora, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                            lora_target_modules=args.lora_target_modules))
            add_adapters(model, settings, 1234, family.lora_part_counts())
        if compiled:
            model.compile_blocks()
        if not (train and args.optimizer):
            return model, lambda: model.zero_grad(set_to_none=True), None
        flags = parse_flags(["--mm-model", args.model, "--bf16", "--lr", "1e-5", "--micro-batch-size", "1"])
        ddp, optimizer = wrap_for_training([model], config, flags, acc)

        def zero_grad():
            ddp[0].zero_grad_buffer()
            optimizer.zero_grad()

        def update():
            finalize_model_grads(ddp)  # what megatron's schedules call after the backward
            optimizer.step()
        return ddp[0], zero_grad, update

    def build_diffusers(compiled: bool, recompute: str):
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=arch.patch_size, num_attention_heads=arch.num_heads, attention_head_dim=arch.head_dim,
            in_channels=arch.in_dim, out_channels=arch.out_dim, text_dim=arch.text_dim, freq_dim=arch.freq_dim,
            ffn_dim=arch.ffn_dim, num_layers=arch.num_layers, cross_attn_norm=arch.cross_attn_norm,
            eps=arch.eps).to(dev, torch.bfloat16).train(train)
        if recompute == "ckpt":
            model.enable_gradient_checkpointing()
        if compiled:
            model.compile_repeated_blocks()
        if not (train and args.optimizer):
            return model, lambda: model.zero_grad(set_to_none=True), None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def update():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
        return model, lambda: optimizer.zero_grad(set_to_none=True), update

    def build(impl: str, compiled: bool, recompute: str, lora: int | None):
        return build_mm(compiled, recompute, lora) if impl == "mm" else build_diffusers(compiled, recompute)

    forwards = {"mm": lambda m: m(latents, timestep, context),
                "diffusers": lambda m: m(latents, timestep, context, return_dict=False)[0]}
    for name, impl, compiled, recompute, kernel, lora in specs:
        model = None
        destroy_parallel()
        initialize_parallel(ParallelSizes(world_size=1), seed=1234, attention_kernel=kernel)
        try:
            model, zero_grad, update = build(impl, compiled, recompute, lora)
            forward = forwards[impl]

            def step():
                if train:
                    zero_grad()
                    forward(model).float().mean().backward()
                    if update is not None:
                        update()
                else:
                    with torch.no_grad():
                        forward(model)

            seconds, mem = _time(step, args.repeats, args.warmups)
            tflops = flops / seconds / 1e12
            rows.append((name, f"{seconds:.3f}", f"{mem:.1f}", f"{tflops:.0f}", f"{100 * tflops / peak:.1f}%"))
            if args.profile is not None:
                profiles.append(profile_step(step, f"{args.mode}-{name}", args.profile, args.profile_rows))
        except Exception as e:  # noqa: BLE001 - one variant's failure (e.g. a kernel missing) does not end the run
            if not is_oom(e):
                traceback.print_exc()
            rows.append((name, "OOM" if is_oom(e) else "error", "-", "-", "-"))
        finally:
            model = zero_grad = update = None
            torch.cuda.empty_cache()

    header = (f"{gpu} | torch {torch.__version__} | {args.mode} | {arch.num_layers} layers, hidden "
              f"{arch.hidden_size}, {tokens} video tokens ({f}x{h}x{w} latents), {args.text_len} text tokens, bf16, "
              f"batch 1{' | optimizer step included' if train and args.optimizer else ''} | MFU vs {peak:.0f} TFLOP/s"
              + (f" | +loraR: adapters on {' '.join(args.lora_target_modules)}, alpha {args.lora_alpha or 'R'}, the "
                 "rest frozen (FLOPs counted as full training's)" if any(spec[-1] for spec in specs) else ""))
    if args.row_file is not None:  # a variant's own process: its parent prints the table
        args.row_file.write_text(json.dumps({"rows": rows, "profiles": profiles, "header": header}))
        return
    _report(args, rows, profiles, header)


def _report(args, rows: list[tuple], profiles: list[str], header: str) -> None:
    """The table (and the profiles' summaries) of every variant."""
    for text in profiles:
        print(text + "\n")
    print(f"\n{header}")
    print(f"{'variant':<32} {'s/step' if args.mode == 'train' else 's/fwd':>8} {'peak GiB':>9} {'TFLOP/s':>8} "
          f"{'MFU':>7}")
    for row in rows:
        print(f"{row[0]:<32} {row[1]:>8} {row[2]:>9} {row[3]:>8} {row[4]:>7}")


if __name__ == "__main__":
    main()
