"""The training loop's guards against divergence: a limit on iterations skipped in a row
(``--max-consecutive-skipped-iterations``) and the check that the weights a checkpoint would hold
are finite.

An iteration is skipped (no optimizer step) when its loss is NaN/Inf on any rank, or, with
``--fp16``, when the gradients overflow. Overflows while the dynamic loss scale can still be
lowered are the scaler's search for its scale (megatron-core halves it from
``--initial-loss-scale`` and skips those steps), so they do not count; an overflow at a static
``--loss-scale`` or at the scaler's minimum does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class TrainingStopped(RuntimeError):
    """The loop gave up (divergence, or weights that must not be saved); every rank raises it at the
    same iteration, and the entry point exits with code 1."""


class SkipStreak:
    """The iterations skipped in a row that count toward ``limit`` (0: no limit)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.first: int | None = None  # the streak's first iteration
        self.length = 0

    def update(self, iteration: int, counts: bool) -> None:
        """Record ``iteration``: ``counts`` when it was skipped for a reason that counts (see the
        module docstring); any other iteration ends the streak."""
        if not counts:
            self.first, self.length = None, 0
            return
        if self.length == 0:
            self.first = iteration
        self.length += 1

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.length >= self.limit


def skip_counts(nan_loss: bool, overflow: bool, loss_scale: float | None, min_loss_scale: float,
                static_scale: bool) -> bool:
    """Whether a skipped iteration counts toward the limit: a NaN/Inf loss always does, an fp16
    overflow only when the loss scale cannot be lowered any more (``static_scale``, or
    ``loss_scale`` at ``min_loss_scale``)."""
    if nan_loss:
        return True
    if not overflow:
        return False
    return static_scale or loss_scale is None or loss_scale <= min_loss_scale


def weights_finite(model_chunks: Sequence[torch.nn.Module], averages: Sequence[dict] | None = None) -> bool:
    """True when every parameter of the model chunks (and every tensor of the EMA ``averages``) on
    every rank is finite. Every rank must call this; all get the same answer (a MAX all-reduce of one
    flag over the default group, on the parameters' device)."""
    tensors = [p for chunk in model_chunks for p in chunk.parameters()]
    tensors += [t for average in averages or [] for t in average.values()]
    device = tensors[0].device if tensors else torch.device("cpu")
    with torch.no_grad():
        bad = torch.zeros((), dtype=torch.float32, device=device)
        for t in tensors:
            bad = torch.maximum(bad, torch.logical_not(torch.isfinite(t).all()).to(bad.device, torch.float32))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


__all__ = ["SkipStreak", "TrainingStopped", "skip_counts", "weights_finite"]
