"""A checkpoint's manifest, and the checks that run before any of its tensors is read.

Every writer (the training loop's ``save_checkpoint``, mm-convert's ``write_mm``) records
``manifest.json`` inside the checkpoint directory before publishing it::

    {"manifest_version": 1,
     "files": {".metadata": {"size": 47307, "sha256": "9f2c..."},
               "__0_0.distcp": {"size": 1010321}, ...}}

every file's size (paths relative to the checkpoint directory), and the SHA-256 of the small
metadata files everything else is found through (``CHECKSUMMED``: torch_dist's ``.metadata`` and
``metadata.json``, megatron's legacy ``common.pt``, the torch format's ``checkpoint.json``).

``verify_checkpoint`` runs before loading: the manifest (a file missing, of another size or with
another checksum), then what the format itself says about its files (torch_dist: every byte range
``.metadata`` gives lies inside an existing file; torch: every rank file the header implies is
there) and the header. Checkpoints written before manifests existed get the format's checks.
Every problem is a ``DamagedCheckpointError`` naming the checkpoint's parent directory and the
file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

from mm.ckpt.header import CheckpointHeader, read_header
from mm.ckpt.layout import (
    DIST_INDEX,
    DIST_METADATA,
    HEADER_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointError,
    DamagedCheckpointError,
    checkpoint_format,
    failure_reason,
    rank_dir,
)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHECKSUMMED = (DIST_INDEX, DIST_METADATA, "common.pt", HEADER_FILE)
_SHOWN = 5  # problems listed in one error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path) -> dict[str, Any]:
    """Record ``path``'s files (recursively) in ``path/manifest.json`` (a temporary file, fsynced,
    then renamed). Call it once every file of the checkpoint is written, before publishing it.
    Returns the manifest."""
    files = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.name in (MANIFEST, f".{MANIFEST}.tmp"):
            continue
        entry: dict[str, Any] = {"size": f.stat().st_size}
        if f.name in CHECKSUMMED:
            entry["sha256"] = _sha256(f)
        files[f.relative_to(path).as_posix()] = entry
    manifest = {"manifest_version": MANIFEST_VERSION, "files": files}
    tmp = path / f".{MANIFEST}.tmp"
    with open(tmp, "w") as out:
        json.dump(manifest, out, indent=1, sort_keys=True)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path / MANIFEST)
    return manifest


def _damaged(path: Path, flag: str, problems: list[str]) -> DamagedCheckpointError:
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return DamagedCheckpointError(f"{flag} {path.parent}: {path} is damaged: {'; '.join(problems[:_SHOWN])}{more}")


def manifest_problems(path: Path, flag: str = "--load") -> list[str]:
    """What differs between ``path`` and its manifest (empty without a manifest)."""
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        return []
    try:
        manifest = json.loads(manifest_file.read_text())
        version, files = manifest["manifest_version"], manifest["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{manifest_file} cannot be read: {failure_reason(e)}"]
    if version != MANIFEST_VERSION:
        raise CheckpointError(f"{flag} {path.parent}: {manifest_file} has manifest_version {version}; this version of "
                              f"mm reads {MANIFEST_VERSION}")
    problems = []
    for name, size in sizes.items():
        f = path / name
        try:
            actual = f.stat().st_size
        except FileNotFoundError:
            problems.append(f"{f} is missing (the manifest records {size} bytes)")
            continue
        except OSError as e:
            problems.append(f"{f} cannot be read: {failure_reason(e)}")
            continue
        if actual != size:
            problems.append(f"{f} has {actual} bytes, the manifest records {size} "
                            f"({'truncated' if actual < size else 'rewritten'})")
        elif "sha256" in files[name] and _sha256(f) != files[name]["sha256"]:
            problems.append(f"{f} does not match its SHA-256 in the manifest (changed after the save)")
    return problems


def _index_problems(path: Path, flag: str) -> list[str]:
    """torch_dist: ``.metadata`` readable, and every byte range it gives inside an existing file."""
    from torch.distributed.checkpoint import FileSystemReader

    index = path / DIST_INDEX
    if not index.is_file():
        return [f"{index} is missing"]
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or overwritten pickle: EOFError, UnpicklingError, ...
        return [f"{index} cannot be read (truncated or overwritten?): {failure_reason(e)}"]
    ends: dict[str, tuple[int, str]] = {}  # file -> (end of its furthest tensor, that tensor)
    for item, info in (getattr(metadata, "storage_data", None) or {}).items():
        end = info.offset + info.length
        if end > ends.get(info.relative_path, (-1, ""))[0]:
            ends[info.relative_path] = (end, item.fqn)
    problems = []
    for name, (end, tensor) in sorted(ends.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing ({DIST_INDEX} places {tensor} and others there)")
        elif f.stat().st_size < end:
            problems.append(f"{f} has {f.stat().st_size} bytes, but {DIST_INDEX} places {tensor} up to byte {end} "
                            "(truncated)")
    return problems


def _rank_file_problems(path: Path, header: CheckpointHeader) -> list[str]:
    """torch format: every (TP, PP) rank's files that the header implies."""
    parallel = header.parallel
    names = [MODEL_FILE] + ([OPTIM_FILE] if parallel.distributed_optimizer and header.content.optimizer else [])
    pp = parallel.pipeline_model_parallel_size
    return [f"{f} is missing" for tp in range(parallel.tensor_model_parallel_size) for stage in range(pp)
            for f in (rank_dir(path, tp, stage, pp) / name for name in names) if not f.is_file()]


def verify_checkpoint(path: Path, flag: str = "--load") -> CheckpointHeader:
    """Check the checkpoint directory ``path`` before any tensor is read (see the module
    docstring); returns its header. DamagedCheckpointError naming the file(s) when a check fails.
    Reads files only (no collectives); reading ``.metadata`` and hashing the small files is all
    it costs."""
    problems = manifest_problems(path, flag)
    if not problems and checkpoint_format(path) == "torch_dist":
        problems = _index_problems(path, flag)
    if problems:
        raise _damaged(path, flag, problems)
    header = read_header(path, flag)
    if header.format == "torch":
        problems = _rank_file_problems(path, header)
        if problems:
            raise _damaged(path, flag, problems)
    return header


def load_torch_file(file: Path, where: str, **kwargs) -> Any:
    """``torch.load(file, map_location="cpu", **kwargs)``; a file that cannot be read (missing,
    truncated, not a torch file) is a DamagedCheckpointError naming it after ``where`` (the option
    and directory that led to it, e.g. ``--load /ckpt``)."""
    import torch

    try:
        return torch.load(file, map_location="cpu", **kwargs)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # zip reader: RuntimeError
        raise DamagedCheckpointError(f"{where}: cannot read {file}: {failure_reason(e)}") from None
