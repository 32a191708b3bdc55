"""Encoder data parallelism: the ranks of a TP x CP group hold the same batch; instead of each
encoding all of it, each encodes a contiguous share of the samples and the shares are gathered,
so every rank ends with exactly the tensors it would have computed alone.

Shares differ by at most one sample; a rank with no sample (batch smaller than the group)
encodes nothing. Works on gloo, NCCL and HCCL (one all-gather of equal-sized, zero-padded shares).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]  # sent by index


def share_bounds(batch: int, group_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s samples out of ``batch``."""
    base, extra = divmod(batch, group_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def encode_data_parallel(encode: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                         group: dist.ProcessGroup | None) -> torch.Tensor:
    """``encode(*inputs)`` for the whole batch (dim 0 of every input), sharing the work over ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return encode(*inputs)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch = inputs[0].shape[0]
    start, end = share_bounds(batch, size, rank)
    mine = encode(*(t[start:end] for t in inputs)) if end > start else None
    # every rank needs the output's shape and dtype; group rank 0 always has a sample
    meta = torch.zeros(8, dtype=torch.int64, device=inputs[0].device)
    if rank == 0:
        dims = [mine.dim(), _DTYPES.index(mine.dtype), *mine.shape[1:]]
        meta[: len(dims)] = torch.tensor(dims)
    dist.broadcast(meta, src=dist.get_global_rank(group, 0), group=group)
    ndim, dtype = int(meta[0]), _DTYPES[int(meta[1])]
    row_shape = [int(x) for x in meta[2:1 + ndim]]
    rows = share_bounds(batch, size, 0)[1]  # the largest share
    padded = torch.zeros((rows, *row_shape), dtype=dtype, device=inputs[0].device)
    if mine is not None:
        padded[: mine.shape[0]] = mine
    gathered = torch.empty((size * rows, *row_shape), dtype=dtype, device=padded.device)
    dist.all_gather_into_tensor(gathered, padded, group=group)
    pieces = [gathered[r * rows: r * rows + (share_bounds(batch, size, r)[1] - share_bounds(batch, size, r)[0])]
              for r in range(size)]
    return torch.cat(pieces, dim=0)

