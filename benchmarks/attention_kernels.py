"""Attention kernels of mm.accelerator.attention_kernels at DiT scale, against torch's SDPA.

    python benchmarks/attention_kernels.py --tokens 32760 --heads 12 --head-dim 128

bf16, batch 1, no mask; every kernel mm has on CUDA here (flash3 where flash-attention 3 is
installed). FLOPs: forward 4 * s^2 * d * heads, forward+backward 3.5x that (the backward recomputes
the scores). Median over --repeats after a warm-up, timed with CUDA events.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from mm.accelerator.attention_kernels import KERNELS, default_scale, kernels_for


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    s, n, d = args.tokens, args.heads, args.head_dim
    q, k, v, dout = (torch.randn(1, n, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = default_scale(d)
    fwd_flops = 4 * s * s * d * n
    rows = []
    for name in kernels_for("cuda"):  # flash3 too where flash-attention 3 is installed
        kernel = KERNELS[name]()
        try:
            out, lse = kernel.forward(q, k, v, scale)
            t_fwd = _time(lambda: kernel.forward(q, k, v, scale), args.repeats)
            t_bwd = _time(lambda: kernel.backward(dout, q, k, v, out, lse, scale), args.repeats)
            rows.append((name, t_fwd, t_bwd))
        except torch.OutOfMemoryError:
            rows.append((name, None, None))
        torch.cuda.empty_cache()
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

    def sdpa_step():
        F.scaled_dot_product_attention(qs, ks, vs).backward(dout)

    t_fwd = _time(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
    rows.append(("torch SDPA (baseline)", t_fwd, _time(sdpa_step, args.repeats) - t_fwd))
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {s} tokens, {n} heads, head dim {d}, bf16")
    print(f"{'kernel':<24} {'fwd ms':>8} {'fwd TFLOP/s':>12} {'fwd+bwd ms':>11} {'fwd+bwd TFLOP/s':>16}")
    for name, t_f, t_b in rows:
        if t_f is None:
            print(f"{name:<24} {'OOM':>8}")
            continue
        print(f"{name:<24} {t_f * 1e3:>8.2f} {fwd_flops / t_f / 1e12:>12.0f} {(t_f + t_b) * 1e3:>11.2f} "
              f"{3.5 * fwd_flops / (t_f + t_b) / 1e12:>16.0f}")


if __name__ == "__main__":
    main()
