"""Name tables between a DiT's mm state-dict keys and a release's (diffusers, the original release,
MindSpeed-MM, ...), with the tensor-parallel split of each tensor; the machinery every predictor's
``weights.py`` shares (each declares its rows, formats, how to tell its formats apart and how its
release's config.json maps to its predictor config). A family's ``NameTable`` is the one
description of its weights that loading release weights, distributed-checkpoint sharding
(``sharding.py``) and mm-convert (``checkpoint/``) all use.

A row (``rule``) has ``mm`` (a key, ``{i}`` standing for a layer number), ``sources(fmt)`` (the
release key(s) of format ``fmt``; several keys are fused: mm's TP rank r holds the concatenation of
rank r's slice of each, so a fused q/k/v shard holds that rank's heads of q, k and v) and ``split``
("column": dim 0 per TP rank, "row": dim 1 per rank, None: replicated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

_SPLIT_DIM = {"column": 0, "row": 1}
# a source tensor's shape, or None when the source does not hold it
ShapeOf = Callable[[str], Optional[list[int]]]


class WeightMappingError(KeyError):
    """Source weights do not match the model: missing, unexpected or misshapen keys, all listed."""

    def __str__(self) -> str:
        return self.args[0]


def is_weight_key(key: str) -> bool:
    """State-dict entries that are tensors of the model (megatron layers add ``_extra_state``)."""
    return not key.endswith("._extra_state")


class ReleaseConfigError(ValueError):
    """A release's config.json that is incomplete, or disagrees with the weights beside it."""


def tp_shard(tensor: torch.Tensor, split: str | None, tp_size: int, tp_rank: int, key: str) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of a full tensor under the table's ``split`` (a view)."""
    if split is None or tp_size == 1:
        return tensor
    dim = _SPLIT_DIM[split]
    if tensor.shape[dim] % tp_size:
        raise WeightMappingError(f"{key}: dim {dim} of shape {tuple(tensor.shape)} is not divisible by TP {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def tp_split(parts: Sequence[torch.Tensor], split: str | None, tp_size: int, tp_rank: int,
             key: str) -> torch.Tensor:
    """TP rank ``tp_rank``'s tensor of one row from the full tensors of its ``parts`` (a fused row:
    the rank's slice of each part, concatenated along dim 0)."""
    pieces = [tp_shard(p, split, tp_size, tp_rank, key) for p in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def tp_merge(shards: Sequence[torch.Tensor], split: str | None, parts: int) -> list[torch.Tensor]:
    """The inverse of ``tp_split``: every TP rank's tensor of one row, in rank order -> the full
    tensor of each of its ``parts``."""
    pieces = [s.chunk(parts, dim=0) if parts > 1 else (s,) for s in shards]
    if split is None or len(shards) == 1:
        return list(pieces[0])
    return [torch.cat([p[j] for p in pieces], dim=_SPLIT_DIM[split]) for j in range(parts)]


def global_name(local_name: str, layer_offset: int) -> str:
    """``blocks.{i}.rest`` of a pipeline stage whose first layer is ``layer_offset`` ->
    ``blocks.{layer_offset + i}.rest``; other names unchanged."""
    if not local_name.startswith("blocks."):
        return local_name
    index, rest = local_name[len("blocks."):].split(".", 1)
    return f"blocks.{int(index) + layer_offset}.{rest}"


# a LoRA adapter tensor of a linear: ``<linear>.lora_A.<part>`` / ``<linear>.lora_B.<part>`` (mm.models.predictor.lora)
_ADAPTER = re.compile(r"^(?P<linear>.+)\.lora_(?P<matrix>[AB])\.(?P<part>\d+)$")
# how TP splits an adapter matrix, by the split of its linear's weight: a column-parallel linear splits
# B by output rows and keeps A whole; a row-parallel one splits A by input columns and keeps B whole
_ADAPTER_SPLIT = {("column", "A"): None, ("column", "B"): "column", ("row", "A"): "row", ("row", "B"): None}


@dataclass(frozen=True)
class LoraRule:
    """The row of one adapter matrix, derived from its linear's weight row: part ``part`` of a fused
    linear is the release's own linear (diffusers' ``to_k`` of q/k/v), so its release names are that
    part's with ``.weight`` -> ``.lora_A.weight`` / ``.lora_B.weight`` (PEFT's names)."""

    base: Any
    matrix: str  # "A" or "B"
    part: int

    @property
    def mm(self) -> str:
        return f"{self.base.mm[:-len('.weight')]}.lora_{self.matrix}.{self.part}"

    @property
    def split(self) -> str | None:
        return _ADAPTER_SPLIT[(self.base.split, self.matrix)]

    @property
    def fused_parts(self) -> int:
        return 1

    def sources(self, fmt: str) -> tuple[str, ...]:
        source = self.base.sources(fmt)[self.part]
        return (f"{source[:-len('.weight')]}.lora_{self.matrix}.weight",)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclass
class NameTable:
    """One model family's weights.

    Args:
        model: the model in messages ("Wan DiT").
        rows: the table: ``.mm`` (a template, ``{i}`` a layer number), ``.split`` ("column", "row"
            or None), ``.fused_parts`` and ``.sources(fmt)`` (the release's templates).
        formats: the release formats the rows know; the first is the one mm_to_hf writes.
        detect_format: the release's key names -> their format; WeightMappingError when unknown.
        ignored: format -> patterns of release tensors that have no counterpart in mm.
        head_prefixes: mm keys (outside the layers) that the last pipeline stage holds; the other
            non-layer keys sit on the first.
        read_arch: (config.json, format, ShapeOf, config.json's path for messages) -> the
            predictor config mm records in a checkpoint's header (the model JSON's predictor keys);
            ReleaseConfigError when the config is incomplete or disagrees with the weights.
        hf_config: a recorded predictor config -> the config.json mm_to_hf writes.
        expected_keys: a predictor config -> every mm key of the whole model; when given, a
            release must hold exactly these (else rows whose tensors are all absent are optional).
    """

    model: str
    rows: list
    formats: tuple[str, ...]
    detect_format: Callable[[Any], str]
    ignored: dict[str, tuple[re.Pattern, ...]] = field(default_factory=dict)
    head_prefixes: tuple[str, ...] = ()
    read_arch: Optional[Callable[[dict, str, ShapeOf, str], dict[str, Any]]] = None
    hf_config: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None
    expected_keys: Optional[Callable[[dict[str, Any]], list[str]]] = None

    def __post_init__(self) -> None:
        self._patterns = [(_pattern(rule.mm), rule) for rule in self.rows]

    @property
    def hf_format(self) -> str:
        """The format mm_to_hf writes."""
        return self.formats[0]

    def is_head(self, mm_key: str) -> bool:
        """Whether the last pipeline stage holds ``mm_key`` (else a non-layer key sits on the first)."""
        return not mm_key.startswith("blocks.") and mm_key.startswith(self.head_prefixes)

    def source_layer_pattern(self, fmt: str) -> re.Pattern:
        """Matches a release's layer tensor of ``fmt`` and captures its layer number (the prefixes
        before ``{i}`` in the layer rows: ``blocks.``, ``transformer_blocks.`` ...)."""
        prefixes = sorted({s.split("{i}")[0] for rule in self.rows if "{i}" in rule.mm for s in rule.sources(fmt)})
        return re.compile("^(?:" + "|".join(map(re.escape, prefixes)) + r")(\d+)\.")

    def rule_for(self, mm_key: str):
        """The row of an mm key and its placeholder values (an adapter's: ``LoraRule`` of its linear's)."""
        adapter = _ADAPTER.match(mm_key)
        if adapter is not None:
            base, values = self.rule_for(f"{adapter['linear']}.weight")
            part = int(adapter["part"])
            if base.split not in ("column", "row") or part >= base.fused_parts:
                raise WeightMappingError(f"mm key {mm_key!r}: {adapter['linear']} is not a tensor-parallel linear "
                                         f"with a part {part} in the {self.model} name table")
            return LoraRule(base, adapter["matrix"], part), values
        for pattern, rule in self._patterns:
            match = pattern.match(mm_key)
            if match:
                return rule, match.groupdict()
        raise WeightMappingError(f"mm key {mm_key!r} has no row in the {self.model} name table")

    def hf_to_mm(self, source: dict[str, torch.Tensor], mm_keys, tp_size: int = 1, tp_rank: int = 0,
                 fmt: str | None = None, check_unexpected: bool = True) -> dict[str, torch.Tensor]:
        """The mm tensors named ``mm_keys`` for TP rank ``tp_rank`` of ``tp_size``, from a full source
        state dict. Raises WeightMappingError listing every missing and (``check_unexpected``: a
        pipeline stage uses only part of the source) unexpected source key."""
        fmt = fmt or self.detect_format(source)
        if fmt not in self.formats:
            raise ValueError(f"format {fmt!r}; valid: {self.formats}")
        out, used, missing = {}, set(), []
        for key in mm_keys:
            rule, values = self.rule_for(key)
            names = [s.format(**values) for s in rule.sources(fmt)]
            used.update(names)
            absent = [n for n in names if n not in source]
            if absent:
                missing.extend(absent)
                continue
            out[key] = tp_split([source[n] for n in names], rule.split, tp_size, tp_rank, key)
        ignored = self.ignored.get(fmt, ())
        unexpected = sorted(k for k in source if k not in used and not any(p.match(k) for p in ignored)) \
            if check_unexpected else []
        if missing or unexpected:
            lines = [f"{fmt} weights do not match the model:"]
            if missing:
                lines.append(f"  missing ({len(missing)}): {', '.join(sorted(missing))}")
            if unexpected:
                lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
            raise WeightMappingError("\n".join(lines))
        return out

    def mm_to_hf(self, shards: list[dict[str, torch.Tensor]], fmt: str | None = None) -> dict[str, torch.Tensor]:
        """Merge the (global-named) state dicts of all TP ranks, in rank order, into full source tensors."""
        fmt = fmt or self.formats[0]
        out = {}
        for key in filter(is_weight_key, shards[0]):
            rule, values = self.rule_for(key)
            names = [s.format(**values) for s in rule.sources(fmt)]
            out.update(zip(names, tp_merge([shard[key] for shard in shards], rule.split, len(names))))
        return out

    def load(self, model: torch.nn.Module, source: dict[str, torch.Tensor], tp_size: int, tp_rank: int,
             fmt: str | None, whole: bool) -> None:
        """Load full source weights into this rank's (TP-sharded) model, or one pipeline stage of it
        (``model.layer_offset``; ``whole``: the model holds every layer, so every source key must be
        used); missing/unexpected keys and shape mismatches are all listed in one error."""
        offset = getattr(model, "layer_offset", 0)
        own = {global_name(k, offset): v for k, v in model.state_dict().items()}
        keys = [k for k in own if is_weight_key(k)]
        mapped = self.hf_to_mm(source, keys, tp_size, tp_rank, fmt, check_unexpected=whole)
        bad = [f"{k}: source gives {tuple(v.shape)}, model has {tuple(own[k].shape)}"
               for k, v in mapped.items() if v.shape != own[k].shape]
        if bad:
            raise WeightMappingError("shape mismatch:\n  " + "\n  ".join(bad))
        with torch.no_grad():
            for key, value in mapped.items():
                own[key].copy_(value)


def read_weights(path: str, key: str = "predictor.from_pretrained") -> dict[str, torch.Tensor]:
    """Every tensor of a DiT checkpoint: a directory of ``*.safetensors`` files (diffusers' sharded
    layout, the original release's single file, Phantom-Wan-14B's shards), one ``.safetensors``
    file, or a ``{name: tensor}`` state dict saved by ``torch.save`` (``.pth`` / ``.pt``, as
    Phantom-Wan-1.3B.pth; ``mm.models.release_file``: one wrapped is unwrapped); read without running
    pickled code."""
    from pathlib import Path

    from safetensors.torch import load_file

    from mm.models.release_file import read_state_dict

    source = Path(path)
    if source.is_file() and source.suffix in (".pth", ".pt"):
        return read_state_dict(source, key, "Phantom-Wan-1.3B.pth")
    files = [source] if source.is_file() and source.suffix == ".safetensors" else sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{key} = {path!r}: no *.safetensors files there; valid: a directory of "
                                "*.safetensors files, a .safetensors file or a .pth/.pt state dict")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 -- safetensors' errors (truncated, corrupt) do not name the file
            raise ValueError(f"{key} = {path!r}: {f} cannot be read: {type(e).__name__}: {e}") from None
    return state
