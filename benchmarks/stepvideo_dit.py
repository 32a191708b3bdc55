"""The Step-Video-T2V DiT at release size on one GPU: an inference forward (no grad) of the whole
30B DiT, or a training step (forward + backward) of a few layers, or the VAE's decode; random weights.

    python benchmarks/stepvideo_dit.py --mode infer --latent 36 34 62 --batch 2 --kernel cudnn
    python benchmarks/stepvideo_dit.py --mode train --latent 24 34 62 --layers 1 --kernel cudnn
    python benchmarks/stepvideo_dit.py --mode vae --latent 36 34 62

``--latent F H W``: latent frames, rows, columns (204 x 544 x 992 -> 36 x 34 x 62 = 75,888 tokens;
MindSpeed-MM's training 136 x 544 x 992 -> 24 x 34 x 62 = 50,592). ``--batch 2`` is one CFG sampling step
(both branches in one batch, as the sampler runs them on one rank). The Step-LLM context is cut to the
batch's longest prompt, ``--llm-len`` tokens (the other row ``--llm-len // 2``), plus 77 CLIP tokens.
Prints one JSON line: seconds per forward / step (median of ``--repeats`` after ``--warmups``), peak
GPU memory, model TFLOP/s (``mm.families.stepvideo.flops``: matmuls; training 3x the forward,
recompute not counted) and MFU over the dense bf16 peak (989 TFLOP/s for H100/H200 SXM). ``--mode
vae``: the release-size VAE (version 2) decoding the latents, seconds and peak memory.
"""

from __future__ import annotations

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core/diffusers are imported: their known notices (MM_VERBOSE=1 shows them)

import argparse
import json
import statistics
import time

import torch

from mm.accelerator import init_distributed, select_accelerator
from mm.accelerator.attention_kernels import KERNEL_CHOICES
from mm.families import build_predictor
from mm.families.stepvideo.config import StepVideoDiTConfig
from mm.families.stepvideo.flops import stepvideo_forward_flops
from mm.parallel import ParallelSizes, initialize_parallel

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
RELEASE = {"num_layers": 48, "num_heads": 48, "head_dim": 128}


def _time(acc, step, repeats: int, warmups: int) -> tuple[float, float]:
    acc.synchronize()
    for _ in range(warmups):
        step()
    acc.synchronize()
    acc.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        acc.synchronize()
        start = time.perf_counter()
        step()
        acc.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), acc.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("infer", "train", "vae"), default="infer")
    parser.add_argument("--latent", type=int, nargs=3, default=[36, 34, 62], metavar=("F", "H", "W"))
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--llm-len", type=int, default=160)
    parser.add_argument("--kernel", choices=KERNEL_CHOICES, default="auto")
    parser.add_argument("--recompute", choices=("none", "full"), default="none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="compile each DiT layer (compile_blocks)")
    parser.add_argument("--profile", default=None, help="also write torch.profiler's kernel table of one step here")
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of the script itself (tiny --latent/--layers)")
    args = parser.parse_args()
    acc = select_accelerator(args.accelerator)
    init_distributed(acc, 30)
    initialize_parallel(ParallelSizes(world_size=1), seed=1234, attention_kernel=args.kernel)
    gpu = torch.cuda.get_device_name() if args.accelerator == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 989.0)
    dev = acc.device()
    f, h, w = args.latent
    result = {"mode": args.mode, "gpu": gpu, "latent": args.latent, "tokens": f * h * w, "kernel": args.kernel,
              "compiled": args.compile}
    if args.mode == "vae":
        from mm.families.stepvideo.vae import StepVideoVAE, StepVideoVAEConfig

        vae = StepVideoVAE(StepVideoVAEConfig.from_json({"version": 2})).to(dev, torch.bfloat16).eval()
        z = torch.randn(1, 64, f, h, w, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            seconds, mem = _time(acc, lambda: vae.decode(z), args.repeats, args.warmups)
        result.update(seconds=round(seconds, 3), peak_gib=round(mem, 2), frames=f // 3 * 17)
        print(json.dumps(result), flush=True)
        return

    from megatron.core.transformer import TransformerConfig

    arch = StepVideoDiTConfig.from_json(dict(RELEASE, num_layers=args.layers))
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if args.recompute == "full" else {}
    config = TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                               num_attention_heads=arch.num_heads, params_dtype=torch.bfloat16, bf16=True,
                               **recompute)
    train = args.mode == "train"
    build_start = time.perf_counter()
    model = build_predictor("stepvideodit", arch, config).to(dev).train(train)
    if args.compile:
        model.compile_blocks()
    acc.synchronize()
    result["build_s"] = round(time.perf_counter() - build_start, 1)
    result["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    b = args.batch
    latents = torch.randn(b, arch.in_channels, f, h, w, device=dev, dtype=torch.bfloat16)
    llm = torch.randn(b, 320, arch.llm_channels, device=dev, dtype=torch.bfloat16)
    mask = torch.zeros(b, 320, device=dev, dtype=torch.long)
    for i in range(b):
        mask[i, :args.llm_len if i == 0 else args.llm_len // 2] = 1
    clip = torch.randn(b, 77, arch.clip_channels, device=dev, dtype=torch.bfloat16)
    timestep = torch.full((b,), 0.5, device=dev, dtype=torch.bfloat16)
    parts = stepvideo_forward_flops(arch, f, h, w, args.llm_len, 77, batch_size=b)
    flops = (3 if train else 1) * sum(parts.values())

    def forward():
        return model(latents=latents, timestep=timestep, llm_context=llm, llm_mask=mask, clip_context=clip)

    if train:
        def step():
            model.zero_grad(set_to_none=True)
            forward().float().mean().backward()
    else:
        def step():
            with torch.no_grad():
                forward()
    try:
        seconds, mem = _time(acc, step, args.repeats, args.warmups)
    except torch.OutOfMemoryError:
        result.update(error="OOM", peak_gib=round(acc.max_memory_allocated() / 2**30, 2))
        print(json.dumps(result), flush=True)
        return
    if args.profile:
        from pathlib import Path

        from benchmarks.wan_dit_step import profile_step

        print(profile_step(step, f"stepvideo_{args.mode}_{args.layers}l_b{b}_{args.kernel}", Path(args.profile)),
              flush=True)
    tflops = flops / seconds / 1e12
    result.update(layers=arch.num_layers, batch=b, recompute=args.recompute, seconds=round(seconds, 3),
                  peak_gib=round(mem, 2), tflops=round(tflops, 1), mfu=round(tflops / peak, 4),
                  attention_share=round(sum(v for k, v in parts.items() if k.endswith("_core")) / sum(parts.values()), 3))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
