"""WFVAE VAE-CP on 2 and 4 gloo processes equals one process (and the reference's golden outputs)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.wfvae_helpers import golden, tiny_wfvae


def _video(frames: int) -> torch.Tensor:
    return torch.rand(1, 3, frames, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _wfvae_cp_worker(rank, world, frames):
    from mm.parallel import ParallelSizes, destroy_parallel, get_group, get_group_ranks, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, context_parallel=world, vae_cp_size=world))
    vae = tiny_wfvae()
    group = (get_group("vae_cp"), get_group_ranks("vae_cp"))
    video = golden()[2]["video"] if frames == 17 else _video(frames)
    with torch.no_grad():
        mean, logvar = vae.encode(video, vae_cp=group)
        decoded = vae.decode(mean, vae_cp=group)
    destroy_parallel()
    return mean, logvar, decoded


@pytest.mark.parametrize("world,frames", [(2, 17), (2, 29), (4, 37)])
def test_wfvae_cp_equals_single_process(world, frames):
    vae = tiny_wfvae()
    video = golden()[2]["video"] if frames == 17 else _video(frames)
    with torch.no_grad():
        mean, logvar = vae.encode(video)
        decoded = vae.decode(mean)
    assert decoded.shape[2] == frames
    for r_mean, r_logvar, r_decoded in run_distributed(world, _wfvae_cp_worker, frames):
        torch.testing.assert_close(r_mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r_logvar, logvar, atol=1e-5, rtol=1e-5)
        # the decoder's deeper fp32 stack: 1.7e-5 apart where the chunk shapes differ
        torch.testing.assert_close(r_decoded, decoded, atol=1e-4, rtol=1e-5)
    if frames == 17:  # the fixture's clip: also the reference's numbers
        ref = golden()[2]
        torch.testing.assert_close(r_mean, ref["video_mean"], atol=1e-4, rtol=0)
        torch.testing.assert_close(r_decoded, ref["video_decoded"], atol=1e-4, rtol=0)
