"""Wan VAE encode + decode of one clip at full size (random weights), mm vs diffusers, same process.

    python3 benchmarks/wan_vae.py --frames 81 --height 480 --width 832 --dtype bf16

Both models get the same weights; prints seconds and peak GPU memory for encode and decode, and
the largest difference between the two implementations' outputs.
"""

from __future__ import annotations

import argparse
import time

import torch

from mm.models.ae import WanVAE, WanVAEConfig


def _timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    ref = AutoencoderKLWan().to("cuda", dtype).eval()
    ours = WanVAE(WanVAEConfig())
    ours.load_state_dict(ref.state_dict())
    ours = ours.to("cuda", dtype).eval()
    video = (torch.rand(1, 3, args.frames, args.height, args.width, device="cuda") * 2 - 1).to(dtype)
    rows = []
    with torch.no_grad():
        for name, encode, decode in (
            ("diffusers (baseline)", lambda: ref.encode(video).latent_dist.mean, lambda z: ref.decode(z).sample),
            ("mm", lambda: ours.encode(video)[0], lambda z: ours.decode(z)),
        ):
            encode()  # warm-up
            z, t_enc, m_enc = _timed(encode)
            x, t_dec, m_dec = _timed(lambda: decode(z))
            rows.append((name, t_enc, m_enc, t_dec, m_dec, z, x))
    (_, *_, z_ref, x_ref), (_, *_, z_mm, x_mm) = rows
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | Wan2.1 VAE, {args.frames}x{args.height}x"
          f"{args.width}, {args.dtype}, latents {tuple(z_mm.shape)}")
    print(f"{'implementation':<22}{'encode s':>9}{'peak GiB':>9}{'decode s':>9}{'peak GiB':>9}")
    for name, t_enc, m_enc, t_dec, m_dec, *_ in rows:
        print(f"{name:<22}{t_enc:>9.2f}{m_enc:>9.1f}{t_dec:>9.2f}{m_dec:>9.1f}")
    print(f"max |latent difference| {(z_mm.float() - z_ref.float()).abs().max().item():.3g}, "
          f"max |frame difference| {(x_mm.float() - x_ref.float()).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
