"""The model JSON's ``inference.lora``: a LoRA adapter over the predictor's weights, applied without
merging (``mm.models.predictor.lora``: the adapted linears add ``scale * alpha / r * B A x``).

Two sources: a LoRA run's ``--save`` directory (an mm checkpoint of the adapters alone, any TP layout:
its header records the rank, alpha and the linears adapted), or the PEFT / diffusers LoRA file that
``mm-convert ... lora_to_hf`` writes (``pytorch_lora_weights.safetensors``, or the directory holding it;
keys ``transformer.<module>.lora_A.weight`` in the family's HuggingFace-side names, rank from the
tensors, alpha from its metadata, else the rank, as diffusers reads it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from mm.ckpt import TRACKER, CheckpointError, find_checkpoint, load_model, read_header
from mm.models.predictor.lora import LoraSettings, add_adapters, is_adapter_key
from mm.models.predictor.name_table import global_name

KEY = "inference.lora"
PEFT_FILE = "pytorch_lora_weights.safetensors"  # what mm-convert lora_to_hf writes, diffusers' default name
PEFT_METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer."


def apply_adapter(model: torch.nn.Module, family, path: str, scale: float, tp_size: int, tp_rank: int) -> LoraSettings:
    """Add the adapter at ``path`` to ``model`` (this rank's whole DiT), its alpha times ``scale``.
    Every rank calls this."""
    root = Path(path)
    if family.lora is None:
        raise CheckpointError(f"{KEY}: the {family.name} family's DiT offers no LoRA adapters")
    if (root / TRACKER).is_file():
        header = read_header(find_checkpoint(root, KEY), KEY)
        if header.lora is None:
            raise CheckpointError(f"{KEY} = {path!r}: holds whole weights, no LoRA adapters (give a LoRA run's --save "
                                  "directory, or load whole weights with --load)")
        settings = LoraSettings.from_dict(header.lora)
        add_adapters(model, dataclasses.replace(settings, alpha=settings.alpha * scale), 0, family.lora_part_counts(),
                     train=False)
        load_model(root, [model], keep=is_adapter_key, flag=KEY, adapters=header.lora)
        return settings
    file = root / PEFT_FILE if root.is_dir() else root
    tensors, alpha = _read_peft(file)
    settings = _peft_settings(family, tensors, alpha, file)
    add_adapters(model, dataclasses.replace(settings, alpha=settings.alpha * scale), 0, family.lora_part_counts(),
                 train=False)
    table = family.lora.table
    offset = getattr(model, "layer_offset", 0)
    own = {global_name(k, offset): p for k, p in model.named_parameters() if is_adapter_key(k)}
    mapped = table.hf_to_mm(tensors, list(own), tp_size, tp_rank, fmt=table.hf_format)
    with torch.no_grad():
        for key, value in mapped.items():
            if value.shape != own[key].shape:
                raise CheckpointError(f"{KEY}: {file}: {key} is {tuple(value.shape)}, this DiT's "
                                      f"{tuple(own[key].shape)}: an adapter of another model")
            own[key].copy_(value)
    return settings


def _read_peft(file: Path) -> tuple[dict[str, torch.Tensor], float | None]:
    from safetensors import safe_open

    if file.suffix != ".safetensors" or not file.is_file():
        raise CheckpointError(f"{KEY}: {file} is neither a LoRA run's checkpoint directory nor a PEFT LoRA "
                              ".safetensors file")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- safetensors' errors do not name the file
        raise CheckpointError(f"{KEY}: {file} cannot be read: {type(e).__name__}: {e}") from None
    config = json.loads(metadata.get(PEFT_METADATA_KEY, "{}"))
    alpha = config.get(f"{PREFIX}lora_alpha", config.get("lora_alpha"))
    return tensors, None if alpha is None else float(alpha)


def _peft_settings(family, tensors: dict[str, torch.Tensor], alpha: float | None, file: Path) -> LoraSettings:
    """The adapters a PEFT file holds, as this family's linears and parts."""
    targets_of = family.lora
    fmt = targets_of.table.hf_format
    naming = 1 + targets_of.table.formats.index(fmt)
    layer = targets_of.table.source_layer_pattern(fmt)
    by_name = {part.names[naming]: part for part in targets_of.parts if len(part.names) > naming}
    targets: dict[str, set[int]] = {}
    ranks, unknown = set(), []
    for key, tensor in tensors.items():
        module, _, matrix = key.rpartition(".lora_")
        match = layer.match(module + ".")
        part = by_name.get(module[match.end():]) if match and matrix in ("A.weight", "B.weight") else None
        if part is None:
            unknown.append(key)
            continue
        targets.setdefault(part.linear, set()).add(part.index)
        if matrix == "A.weight":
            ranks.add(tensor.shape[0])
    if unknown or len(ranks) != 1:
        raise CheckpointError(f"{KEY}: {file}: " + (f"tensors that are no LoRA matrix of a {family.name} layer linear "
                                                   f"({len(unknown)}): {', '.join(unknown[:10])}" if unknown else
                                                   f"adapters of ranks {sorted(ranks)}; mm reads one rank"))
    r = ranks.pop()
    return LoraSettings(r=r, alpha=alpha if alpha is not None else float(r),
                        targets={k: tuple(sorted(v)) for k, v in targets.items()})
