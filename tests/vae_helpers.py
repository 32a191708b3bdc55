"""Tiny Wan VAE configurations (2.1 and 2.2) with diffusers' AutoencoderKLWan as the oracle."""

from __future__ import annotations

import torch

from mm.models.ae import WanVAE, WanVAEConfig

VARIANTS = {
    "wan2.1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                   latents_std=[1.5, 0.5, 2.0, 1.0]),
    "wan2.2": dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   attn_scales=[], temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                   in_channels=12, out_channels=12,
                   scale_factor_spatial=16, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]),
}


def vae_pair(variant):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**VARIANTS[variant]).eval()
    with torch.no_grad():
        for p in ref.parameters():  # informative values everywhere (gains are ones at init)
            p.add_(torch.randn_like(p) * 0.1)
    ours = WanVAE(WanVAEConfig(**VARIANTS[variant])).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref, ours
