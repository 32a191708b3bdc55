"""Encoder-DP on 4 gloo processes (TP2 x CP2 and CP4): every rank gets exactly what it would
encode alone, and each sample is encoded once per group."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed


def _encoder_dp_worker(rank, world, layouts):
    from mm.models.encoder_dp import encode_data_parallel
    from mm.parallel import ParallelSizes, destroy_parallel, get_encoder_dp_group, initialize_parallel

    torch.manual_seed(0)
    weight = torch.randn(6, 10)
    results = []
    for tp, cp, batch in layouts:
        initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=tp, context_parallel=cp))
        g = torch.Generator().manual_seed(100 + batch)  # the same batch on every rank of the group
        frames, ids = torch.randn(batch, 3, 6, generator=g), torch.randint(0, 9, (batch, 4), generator=g)
        encoded = []

        def encode(x, t):
            encoded.append(x.shape[0])
            return torch.tanh(x @ weight[:, :4]).sum(1, keepdim=True) * t.unsqueeze(-1)

        alone = torch.tanh(frames @ weight[:, :4]).sum(1, keepdim=True) * ids.unsqueeze(-1)
        shared = encode_data_parallel(encode, frames, ids.float(), group=get_encoder_dp_group())
        count = torch.tensor([float(sum(encoded))])
        torch.distributed.all_reduce(count, group=get_encoder_dp_group())
        results.append((torch.equal(shared, alone), int(count.item())))
        destroy_parallel()
    return results


@pytest.mark.parametrize("layouts", [[(2, 2, 5), (2, 2, 3)], [(1, 4, 8), (1, 4, 2)]], ids=["tp2_cp2", "cp4"])
def test_encoder_dp_equals_encoding_alone(layouts):
    for rank_results in run_distributed(4, _encoder_dp_worker, layouts):
        for (equal, count), (_, _, batch) in zip(rank_results, layouts):
            assert equal
            assert count == batch  # each sample once per TP x CP group
