"""Step-Video VAE-CP on 2 and 3 gloo processes equals one process, encode and decode, in float64.

The ranks split the 17-frame chunks; the chunk boundaries are cross-faded after the all-gather, so a
boundary between chunks of different ranks is covered: 3 chunks over 2 ranks (2 + 1, the boundary
between chunks 2 and 3 crosses ranks) and 2 chunks over 3 ranks (1 + 1 + 0: one rank only gathers).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.stepvideo_vae_helpers import case_video, fixture_meta, mm_vae_from_fixture

CASE = fixture_meta()["cases"][0]  # the tiny version 2 VAE


def _case(chunks: int) -> dict:
    return dict(CASE, name=f"cp{chunks}", video_shape=[2, 3, 17 * chunks, 16, 16])


def _vae_cp_worker(rank, world, chunks, directory):
    from pathlib import Path

    from mm.parallel import ParallelSizes, destroy_parallel, get_group, get_group_ranks, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, context_parallel=world, vae_cp_size=world))
    vae = mm_vae_from_fixture(CASE, Path(directory) / f"rank{rank}")
    group = (get_group("vae_cp"), get_group_ranks("vae_cp"))
    with torch.no_grad():
        mean, logvar = vae.encode(case_video(_case(chunks)), vae_cp=group)
        decoded = vae.decode(mean, vae_cp=group)
    destroy_parallel()
    return mean, logvar, decoded


@pytest.mark.parametrize("world,chunks", [(2, 3), (3, 2)])
def test_vae_cp_equals_single_process(world, chunks, tmp_path):
    vae = mm_vae_from_fixture(CASE, tmp_path / "single")
    with torch.no_grad():
        mean, logvar = vae.encode(case_video(_case(chunks)))
        decoded = vae.decode(mean)
    assert mean.shape == (2, 4, 3 * chunks, 1, 1) and decoded.shape == (2, 3, 17 * chunks, 16, 16)
    for r_mean, r_logvar, r_decoded in run_distributed(world, _vae_cp_worker, chunks, str(tmp_path)):
        assert r_decoded.dtype == torch.float64
        torch.testing.assert_close(r_mean, mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(r_logvar, logvar, atol=1e-12, rtol=0)
        torch.testing.assert_close(r_decoded, decoded, atol=1e-12, rtol=0)
