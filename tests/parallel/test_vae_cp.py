"""VAE-CP on 2 and 4 gloo processes equals single-process encode and decode (Wan2.1 and Wan2.2).

The twins compare in float64: in fp32 the decoders' outputs differ by up to 5e-6 (different conv
shapes per rank), within a factor of 2 to 4 of an fp32 tolerance, so fp32 agreement would depend on
the CPU's kernels; in float64 they agree to 3e-15.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.vae_helpers import VARIANTS, vae_pair


def _video(variant: str, frames: int) -> torch.Tensor:
    scale = 16 if variant == "wan2.2" else 8
    video = torch.rand(1, 3, frames, 2 * scale, scale, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return video.double()


def _vae_cp_worker(rank, world, variant, frames):
    from mm.parallel import ParallelSizes, destroy_parallel, get_group, get_group_ranks, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, context_parallel=world, vae_cp_size=world))
    vae = vae_pair(variant)[1].double()
    video = _video(variant, frames)
    group = (get_group("vae_cp"), get_group_ranks("vae_cp"))
    with torch.no_grad():
        mean, logvar = vae.encode(video, vae_cp=group)
        decoded = vae.decode(mean, vae_cp=group)
    destroy_parallel()
    return mean, logvar, decoded


@pytest.mark.parametrize("world,frames", [(2, 17), (4, 37)])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vae_cp_equals_single_process(world, frames, variant):
    vae = vae_pair(variant)[1].double()
    with torch.no_grad():
        mean, logvar = vae.encode(_video(variant, frames))
        decoded = vae.decode(mean)
    assert decoded.dtype == torch.float64 and decoded.shape[2] == frames
    for r_mean, r_logvar, r_decoded in run_distributed(world, _vae_cp_worker, variant, frames):
        assert r_decoded.dtype == torch.float64
        torch.testing.assert_close(r_mean, mean, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r_logvar, logvar, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r_decoded, decoded, atol=1e-10, rtol=1e-10)


def test_vae_cp_too_few_frames_is_a_clear_error():
    from mm.models.ae.vae_cp import check_frames

    with pytest.raises(ValueError, match="VAE-CP over 4 ranks needs at least 33 video frames"):
        check_frames(29, 4, "video")
