"""Where a checkpoint's parts lie: Megatron-LM's directory layout, as training saves it and
mm-convert writes it.

::

    <root>/latest_checkpointed_iteration.txt   the tracker: "10", or "release" for converted weights
    <root>/iter_0000010/                       one checkpoint (<root>/release/ for converted weights)
        metadata.json, *.distcp, .metadata     torch_dist: one torch.distributed.checkpoint directory
        checkpoint.json                        torch: mm's header (``header.py``)
        mp_rank_{tp:02d}[_{pp:03d}]/           torch: one directory per (TP, PP) rank
            model_optim_rng.pt                 its model chunks (and optimizer, scheduler, RNG, EMA)
            distrib_optim.pt                   the distributed optimizer's parameter state
"""

from __future__ import annotations

import os
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = -1  # the tracker's "release": weights from mm-convert, not a training iteration
CKPT_FORMATS = ("torch_dist", "torch")
HEADER_FILE = "checkpoint.json"  # the torch format's header; torch_dist keeps it in its common state
DIST_METADATA = "metadata.json"  # what marks a torch_dist checkpoint directory
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
MEGATRON_CHECKPOINT_VERSION = 3.0  # Megatron-LM's entry in every rank file (mm's own version is the header's)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read into this run: the message says which and why."""


def checkpoint_dir(root: str | os.PathLike, iteration: int) -> Path:
    """``<root>/iter_0000010``; ``<root>/release`` for converted weights (iteration ``RELEASE``)."""
    return Path(root) / ("release" if iteration == RELEASE else f"iter_{iteration:07d}")


def read_tracker(root: str | os.PathLike, flag: str = "--load") -> int | None:
    """The iteration in ``<root>/latest_checkpointed_iteration.txt`` (``RELEASE`` for "release");
    None without the file. ``flag`` names the option that gave ``root`` in errors."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return RELEASE
    if not text.isdigit():
        raise CheckpointError(f"{flag} {root}: {tracker} holds {text!r}; expected an iteration number or 'release'")
    return int(text)


def write_tracker(root: str | os.PathLike, iteration: int) -> None:
    """Point ``<root>``'s tracker at ``iteration`` atomically (a temporary file, fsynced, then
    ``os.replace``): a reader sees the old tracker or the new one, never a partial file."""
    root = Path(root)
    tmp = root / f".{TRACKER}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{'release' if iteration == RELEASE else iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER)


def rank_dir(path: Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    """Megatron-LM's ``mp_rank_{tp:02d}`` (no PP) or ``mp_rank_{tp:02d}_{pp:03d}``."""
    return path / (f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")


def checkpoint_format(path: Path) -> str | None:
    """``"torch"`` (a header file), ``"torch_dist"`` (megatron's metadata.json) or None (neither:
    not a complete checkpoint directory)."""
    if (path / HEADER_FILE).is_file():
        return "torch"
    if (path / DIST_METADATA).is_file():
        return "torch_dist"
    return None


def find_checkpoint(root: str | os.PathLike, flag: str = "--load") -> Path | None:
    """The complete checkpoint directory the tracker in ``root`` names; None when ``root`` has no
    tracker. CheckpointError when ``root`` is itself one checkpoint's directory (its parent holds
    the tracker) or the directory the tracker names is missing or incomplete."""
    root = Path(root)
    iteration = read_tracker(root, flag)
    if iteration is None:
        if checkpoint_format(root) is not None:
            raise CheckpointError(f"{flag} {root} is one checkpoint's directory; pass its parent (the directory "
                                  f"holding {TRACKER})")
        return None
    path = checkpoint_dir(root, iteration)
    if checkpoint_format(path) is None:
        named = "release" if iteration == RELEASE else f"iteration {iteration}"
        what = (f"is incomplete (neither {DIST_METADATA} nor {HEADER_FILE})" if path.is_dir() else "does not exist")
        raise CheckpointError(f"{flag} {root}: {TRACKER} names {named}, but {path} {what}")
    return path
