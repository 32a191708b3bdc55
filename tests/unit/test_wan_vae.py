"""The Wan VAE (2.1 and 2.2) against diffusers' AutoencoderKLWan on the same random weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from mm.models.ae import WanVAE, WanVAEConfig
from tests.vae_helpers import VARIANTS, vae_pair


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("frames", [1, 5, 17])
def test_encode_decode_match_diffusers(variant, frames):
    ref, ours = vae_pair(variant)
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


def test_loads_a_diffusers_directory_and_rejects_bad_ones(tmp_path):
    from mm.models.ae import load_wan_vae

    ref, _ = vae_pair("wan2.2")
    ref.save_pretrained(tmp_path / "vae")
    vae = load_wan_vae(str(tmp_path / "vae"))
    video = torch.rand(1, 3, 5, 32, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(video)[0], ref.encode(video).latent_dist.mean, atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(FileNotFoundError, match="ae.from_pretrained = .*no config.json"):
        load_wan_vae(str(tmp_path))
    with pytest.raises(ValueError, match=r"ae keys \['base_dimm'\] are not Wan VAE parameters"):
        WanVAEConfig.from_json({"base_dimm": 8})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_spatial_tiling_matches_diffusers(variant):
    ref, _ = vae_pair(variant)
    ours = WanVAE(WanVAEConfig(**VARIANTS[variant], use_tiling=True, tile_sample_min_size=32, tile_sample_stride=24))
    ours.load_state_dict(ref.state_dict())
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    scale = 16 if variant == "wan2.2" else 8
    video = torch.rand(1, 3, 5, 6 * scale, 8 * scale) * 2 - 1  # several tiles each way
    with torch.no_grad():
        mean, _ = ours.encode(video)
        torch.testing.assert_close(mean, ref.encode(video).latent_dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.decode(mean), ref.decode(mean).sample, atol=1e-4, rtol=0)
