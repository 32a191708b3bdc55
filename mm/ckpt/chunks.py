"""A rank's model chunks as the loops and checkpoints see them: one per virtual pipeline chunk,
megatron-DDP-wrapped or bare."""

from __future__ import annotations

import torch


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's wrappers (DistributedDataParallel, Float16Module: ``.module``)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def chunk_keys(count: int) -> list[str]:
    """megatron's state-dict key of each chunk: ``model`` alone, ``model0``, ``model1``, ... with
    virtual pipelining."""
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]
