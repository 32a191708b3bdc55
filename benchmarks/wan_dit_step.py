"""One bf16 forward+backward of a Wan DiT at video scale, mm vs diffusers, in the same process.

    python benchmarks/wan_dit_step.py --model examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json \
        --latent 21 60 104 --text-len 512 --repeats 3

Random weights (no download), random latents/context, loss = mean of the output. Prints per
implementation and recompute setting: median seconds per forward+backward, peak GPU memory, and
model TFLOP/s from the per-layer formula of docs/benchmarks.md (x3 for forward+backward, not
counting recomputation). An implementation that runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mm.accelerator import init_distributed, select_accelerator
from mm.models.predictor import build_predictor, predictor_config
from mm.parallel import ParallelSizes, initialize_parallel


def model_flops(arch, tokens: int, text_len: int) -> float:
    """Forward FLOPs of all layers (matmuls only): self-attn projections and scores, cross-attn, FFN."""
    n, length, d, f = tokens, text_len, arch.hidden_size, arch.ffn_dim
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * length * d * d + 4 * n * length * d + 4 * n * d * f
    return per_layer * arch.num_layers


def _time(step, repeats: int) -> tuple[float, float]:
    torch.cuda.synchronize()
    step()  # warm-up
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
    parser.add_argument("--only", choices=("mm", "diffusers"), default=None)
    args = parser.parse_args()

    from megatron.core.transformer import TransformerConfig

    acc = select_accelerator("cuda")
    init_distributed(acc, 10)
    initialize_parallel(ParallelSizes(world_size=1), seed=1234)
    pred = json.load(open(args.model))["predictor"]
    params = {k: v for k, v in pred.items() if k not in ("model_id", "from_pretrained", "dtype", "num_layers", "num_heads")}
    arch = predictor_config("wan_dit", params, pred["num_layers"], pred["num_heads"])
    f, h, w = args.latent
    tokens = f * h * w // 4
    flops = 3 * model_flops(arch, tokens, args.text_len)
    dev = acc.device()
    latents = torch.randn(1, arch.in_dim, f, h, w, device=dev, dtype=torch.bfloat16)
    context = torch.randn(1, args.text_len, arch.text_dim, device=dev, dtype=torch.bfloat16)
    timestep = torch.tensor([500.0], device=dev)
    rows = []

    def run(name, build, forward):
        try:
            model = build()
            def step():
                model.zero_grad(set_to_none=True)
                forward(model).float().mean().backward()
            seconds, peak = _time(step, args.repeats)
            rows.append((name, f"{seconds:.3f}", f"{peak:.1f}", f"{flops / seconds / 1e12:.0f}"))
        except torch.OutOfMemoryError:
            rows.append((name, "OOM", "-", "-"))
        finally:
            model = None
            torch.cuda.empty_cache()

    def mm_build(**recompute):
        def build():
            config = TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                                       num_attention_heads=arch.num_heads, params_dtype=torch.bfloat16,
                                       bf16=True, **recompute)
            # megatron's layers allocate on the GPU; the plain torch parts move like Megatron-LM's model.cuda()
            return build_predictor("wan_dit", arch, config).to(dev).train()
        return build

    def diffusers_build(checkpointing):
        def build():
            from diffusers import WanTransformer3DModel
            model = WanTransformer3DModel(
                patch_size=arch.patch_size, num_attention_heads=arch.num_heads, attention_head_dim=arch.head_dim,
                in_channels=arch.in_dim, out_channels=arch.out_dim, text_dim=arch.text_dim, freq_dim=arch.freq_dim,
                ffn_dim=arch.ffn_dim, num_layers=arch.num_layers, cross_attn_norm=arch.cross_attn_norm,
                eps=arch.eps).to(dev, torch.bfloat16).train()
            if checkpointing:
                model.enable_gradient_checkpointing()
            return model
        return build

    mm_forward = lambda m: m(latents, timestep, context)  # noqa: E731
    diffusers_forward = lambda m: m(latents, timestep, context, return_dict=False)[0]  # noqa: E731
    if args.only in (None, "mm"):
        run("mm, no recompute", mm_build(), mm_forward)
        run("mm, full recompute (uniform, 1 layer)",
            mm_build(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), mm_forward)
        run("mm, selective recompute (core attention)", mm_build(recompute_granularity="selective"), mm_forward)
    if args.only in (None, "diffusers"):
        run("diffusers, no checkpointing", diffusers_build(False), diffusers_forward)
        run("diffusers, gradient checkpointing", diffusers_build(True), diffusers_forward)

    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {arch.num_layers} layers, hidden "
          f"{arch.hidden_size}, {tokens} video tokens ({f}x{h}x{w} latents), {args.text_len} text tokens, bf16, batch 1")
    print(f"{'implementation':<44} {'s/step':>8} {'peak GiB':>9} {'TFLOP/s':>8}")
    for row in rows:
        print(f"{row[0]:<44} {row[1]:>8} {row[2]:>9} {row[3]:>8}")


if __name__ == "__main__":
    main()
