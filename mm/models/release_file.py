"""Torch files of model releases (Wan's ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth`` and CLIP
``.pth``, ``Phantom-Wan-1.3B.pth``, Open-Sora-Plan's ``merged.ckpt``): read memory-mapped where the format
allows, unpickled without running code (tensors and plain containers only), every failure naming the
setting that gave the path."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

# one level a state dict is found wrapped in ({"state_dict": {...}}, a training script's {"model": {...}})
WRAPPERS = ("state_dict", "model", "module")


class UnreadableFile(ValueError):
    """A file that is truncated, corrupt or not a torch file at all (a damaged input, not a wrong one)."""


def read_torch_file(path: str | Path, key: str) -> Any:
    """What a torch file holds; ``key`` (a JSON key or flag) names the path's setting in errors.
    FileNotFoundError: no such file; ValueError: pickled objects other than tensors and plain
    containers; UnreadableFile: truncated, corrupt or not a torch file."""
    where = f"{key} = {str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler: a class, or bytes that are no pickle
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(f"{where} holds more than tensors and plain containers ({found.group(1)}), and mm "
                             "does not run pickled code") from None
        detail = " ".join(str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        raise UnreadableFile(f"{where} is not a readable torch file: {detail}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableFile(f"{where} is not a readable torch file (truncated or corrupt?): {detail}") from None


def flat_state(obj: Any, where: str, example: str = "") -> dict[str, torch.Tensor]:
    """``obj`` as a flat ``{name: tensor}`` state dict: one level of wrapping (``WRAPPERS``) and a
    ``module.`` prefix on every name (a DistributedDataParallel module's save) are taken off; anything
    else is a ValueError naming ``where`` (``example``: a release file that is such a state dict)."""
    if isinstance(obj, dict) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in WRAPPERS if isinstance(obj.get(k), dict)]
        if len(inner) == 1:
            obj = obj[inner[0]]
    like = f" ({{name: tensor}}, as {example} is)" if example else " ({name: tensor})"
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict{like}")
    strangers = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if strangers or not obj:
        found = f": entries that are not tensors: {', '.join(strangers[:10])}" if strangers else ": it is empty"
        raise ValueError(f"{where} is not a state dict{like}{found}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | Path, key: str, example: str = "") -> dict[str, torch.Tensor]:
    """The flat state dict of a release's torch file (``read_torch_file``, then ``flat_state``)."""
    return flat_state(read_torch_file(path, key), f"{key} = {str(path)!r}", example)
