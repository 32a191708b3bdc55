"""The Wan VAE (2.1 and 2.2) against diffusers' AutoencoderKLWan on the same random weights (fp32)."""

from __future__ import annotations

import pytest
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


def _pair(variant):
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("frames", [1, 5, 17])
def test_encode_decode_match_diffusers(variant, frames):
    ref, ours = _pair(variant)
    scale = 16 if variant == "wan2.2" else 8
    video = torch.rand(2, 3, frames, 2 * scale, 3 * scale) * 2 - 1  # non-square
    with torch.no_grad():
        dist = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=0)
        assert mean.shape == (2, 4, 1 + (frames - 1) // 4, 2, 3)
        decoded = ours.decode(mean)
        torch.testing.assert_close(decoded, ref.decode(dist.mean).sample, atol=1e-4, rtol=0)
        assert decoded.shape == video.shape


def test_latent_normalisation_roundtrip():
    vae = WanVAE(WanVAEConfig(**VARIANTS["wan2.1"]))
    z = torch.randn(1, 4, 2, 3, 3)
    normed = vae.normalize(z)
    torch.testing.assert_close(normed[:, 1], (z[:, 1] + 0.2) / 0.5)
    torch.testing.assert_close(vae.denormalize(normed), z)
