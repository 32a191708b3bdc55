"""WFVAE VAE-CP on 2 and 4 gloo processes equals one process (and the reference's golden outputs).

The twins compare in float64: the tiny decoder turns a 6e-7 fp32 difference in its input
into 1e-3 at its output, so fp32 agreement depends on the CPU's kernels. The fixture's clip is
also run in fp32 against the reference's numbers.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.wfvae_helpers import golden, tiny_wfvae


def _video(frames: int, dtype: torch.dtype) -> torch.Tensor:
    if frames == 17:  # the fixture's clip
        return golden()[2]["video"].to(dtype)
    return (torch.rand(1, 3, frames, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(dtype)


def _wfvae_cp_worker(rank, world, frames, dtype):
    from mm.parallel import ParallelSizes, destroy_parallel, get_group, get_group_ranks, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, context_parallel=world, vae_cp_size=world))
    vae = tiny_wfvae().to(dtype)
    group = (get_group("vae_cp"), get_group_ranks("vae_cp"))
    video = _video(frames, dtype)
    with torch.no_grad():
        mean, logvar = vae.encode(video, vae_cp=group)
        decoded = vae.decode(mean, vae_cp=group)
    destroy_parallel()
    return mean, logvar, decoded


@pytest.mark.parametrize("world,frames", [(2, 17), (2, 29), (4, 37)])
def test_wfvae_cp_equals_single_process(world, frames):
    vae = tiny_wfvae().double()
    with torch.no_grad():
        mean, logvar = vae.encode(_video(frames, torch.float64))
        decoded = vae.decode(mean)
    assert decoded.shape[2] == frames
    for r_mean, r_logvar, r_decoded in run_distributed(world, _wfvae_cp_worker, frames, torch.float64):
        torch.testing.assert_close(r_mean, mean, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r_logvar, logvar, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r_decoded, decoded, atol=1e-10, rtol=1e-10)


def test_wfvae_cp_matches_the_reference_in_fp32():
    ref = golden()[2]
    for r_mean, _, r_decoded in run_distributed(2, _wfvae_cp_worker, 17, torch.float32):
        torch.testing.assert_close(r_mean, ref["video_mean"], atol=1e-4, rtol=0)
        torch.testing.assert_close(r_decoded, ref["video_decoded"], atol=1e-4, rtol=0)
