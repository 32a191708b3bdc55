"""Where a checkpoint's parts lie: Megatron-LM's directory layout, as training saves it and
mm-convert writes it.

::

    <root>/latest_checkpointed_iteration.txt   the tracker: "10", or "release" for converted weights
    <root>/iter_0000010/                       one checkpoint (<root>/release/ for converted weights)
        manifest.json                          every file's size, the small metadata files' checksums
                                               (``integrity.py``; checkpoints written before it have none)
        metadata.json, *.distcp, .metadata     torch_dist: one torch.distributed.checkpoint directory
        checkpoint.json                        torch: mm's header (``header.py``)
        mp_rank_{tp:02d}[_{pp:03d}]/           torch: one directory per (TP, PP) rank
            model_optim_rng.pt                 its model chunks (and optimizer, scheduler, RNG, EMA)
            distrib_optim.pt                   the distributed optimizer's parameter state
    <root>/.iter_0000020.tmp/                  a save under way (or one that died); never read
    <root>/.iter_0000001.deleting/             an old checkpoint being deleted (--keep-last-checkpoints)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = -1  # the tracker's "release": weights from mm-convert, not a training iteration
CKPT_FORMATS = ("torch_dist", "torch")
HEADER_FILE = "checkpoint.json"  # the torch format's header; torch_dist keeps it in its common state
DIST_METADATA = "metadata.json"  # what marks a torch_dist checkpoint directory
DIST_INDEX = ".metadata"  # torch.distributed.checkpoint's index: every tensor's file and byte range
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
MEGATRON_CHECKPOINT_VERSION = 3.0  # Megatron-LM's entry in every rank file (mm's own version is the header's)
_ITERATION_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read into this run: the message says which and why."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated, changed or unreadable (rather than one that
    does not fit this run): what ``--load-fallback`` steps back from. The message names the
    directory and the file."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def failure_reason(error: BaseException) -> str:
    """One line for an exception from a checkpoint reader or writer: torch's CheckpointException
    (whose text is every failing rank's traceback) reduced to each failing rank's exception."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return _one_line(error)
    ranks: dict[str, list[int]] = {}
    for rank, (exc, _) in sorted(failures.items()):
        ranks.setdefault(_one_line(exc), []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {text}" for text, r in ranks.items())


def checkpoint_dir(root: str | os.PathLike, iteration: int) -> Path:
    """``<root>/iter_0000010``; ``<root>/release`` for converted weights (iteration ``RELEASE``)."""
    return Path(root) / ("release" if iteration == RELEASE else f"iter_{iteration:07d}")


def read_tracker(root: str | os.PathLike, flag: str = "--load") -> int | None:
    """The iteration in ``<root>/latest_checkpointed_iteration.txt`` (``RELEASE`` for "release");
    None without the file. ``flag`` names the option that gave ``root`` in errors."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(f"{flag} {root}: cannot read {tracker}: {e}") from None
    if text == "release":
        return RELEASE
    if not text.isdigit():
        raise DamagedCheckpointError(f"{flag} {root}: {tracker} holds {text!r}; expected an iteration number or "
                                     "'release'")
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
        raise DamagedCheckpointError(f"{flag} {root}: {TRACKER} names {named}, but {path} {what}")
    return path


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, directory)`` of every complete-looking ``iter_*`` directory in ``root`` (one that
    ``checkpoint_format`` recognises), newest first. Hidden names (``.iter_*.tmp`` of a save under
    way, ``.iter_*.deleting``) and ``release`` are not listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _ITERATION_DIR.match(entry.name)
        if match and checkpoint_format(entry) is not None:
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)
