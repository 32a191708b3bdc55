"""VAE context parallelism (``vae_cp_size`` in the model JSON): the ranks of a VAE-CP group each
encode or decode a consecutive slice of a video's frames, and the latents (or frames) are
gathered so every rank ends with the whole result, equal to one device's.

Everything temporal in the Wan VAE is causal, so a rank needs only what precedes its slice: at
every causal convolution (and temporal downsampling) it receives the previous rank's last input
frames to that module (a halo exchange), and sends its own last frames to the next rank. Spatial
operations, attention included, stay inside each frame and need nothing.

Slices follow the VAE's chunking: encoding splits the video's 4-frame chunks (rank 0 also holds
the first frame), decoding splits the latent frames; every rank needs at least 2 chunks / 2 latent
frames so that it can hand two frames on at the deepest level.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def split_counts(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class HaloCache:
    """The ``CausalCache`` interface over a VAE-CP group: what precedes a rank's frames comes from
    the previous rank, and only rank 0's slice starts the video."""

    def __init__(self, group: dist.ProcessGroup, ranks: list[int]):
        self.group, self.ranks = group, ranks
        self.index = ranks.index(dist.get_rank())

    def previous(self, module: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor | None:
        last = len(self.ranks) - 1
        ops, recv = [], None
        if self.index < last:
            if x.shape[2] < frames:
                raise ValueError(f"VAE-CP: a rank holds {x.shape[2]} frames at a layer that hands {frames} on")
            ops.append(dist.P2POp(dist.isend, x[:, :, -frames:].contiguous(), self.ranks[self.index + 1], self.group))
        if self.index > 0:
            recv = torch.empty((x.shape[0], x.shape[1], frames, *x.shape[3:]), dtype=x.dtype, device=x.device)
            ops.append(dist.P2POp(dist.irecv, recv, self.ranks[self.index - 1], self.group))
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return recv

    def at_start(self, module: nn.Module) -> bool:
        return self.index == 0

    def at_end(self, module: nn.Module) -> bool:
        """True on the rank whose slice ends the video (modules that look ahead flush there)."""
        return self.index == len(self.ranks) - 1


def gather_frames(x: torch.Tensor, counts: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather slices of different lengths along dim 2 (frames), in rank order."""
    longest = max(counts)
    padded = torch.zeros((*x.shape[:2], longest, *x.shape[3:]), dtype=x.dtype, device=x.device)
    padded[:, :, : x.shape[2]] = x
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:, :, :n] for g, n in zip(gathered, counts)], dim=2)


def check_frames(frames: int, parts: int, what: str) -> None:
    chunks = (frames - 1) // 4 if what == "video" else frames - 1
    if chunks < 2 * parts:
        need = 1 + (8 if what == "video" else 2) * parts
        raise ValueError(f"VAE-CP over {parts} ranks needs at least {need} {what} frames "
                         f"(two temporal chunks per rank); got {frames}. Lower ae.vae_cp_size or use longer clips")
