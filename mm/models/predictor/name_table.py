"""Name tables between a DiT's mm state-dict keys and a release's (diffusers, the original release,
MindSpeed-MM, ...), with the tensor-parallel split of each tensor; the machinery every predictor's
``weights.py`` shares (each declares only its rows, formats and how to tell its formats apart).

A row (``rule``) has ``mm`` (a key, ``{i}`` standing for a layer number), ``sources(fmt)`` (the
release key(s) of format ``fmt``; several keys are fused: mm's TP rank r holds the concatenation of
rank r's slice of each, so a fused q/k/v shard holds that rank's heads of q, k and v) and ``split``
("column": dim 0 per TP rank, "row": dim 1 per rank, None: replicated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class WeightMappingError(KeyError):
    """Source weights do not match the model: missing, unexpected or misshapen keys, all listed."""

    def __str__(self) -> str:
        return self.args[0]


def is_weight_key(key: str) -> bool:
    """State-dict entries that are tensors of the model (megatron layers add ``_extra_state``)."""
    return not key.endswith("._extra_state")


def tp_shard(tensor: torch.Tensor, split: str | None, tp_size: int, tp_rank: int, key: str) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of a full tensor under the table's ``split`` (a view)."""
    if split is None or tp_size == 1:
        return tensor
    dim = 0 if split == "column" else 1
    if tensor.shape[dim] % tp_size:
        raise WeightMappingError(f"{key}: dim {dim} of shape {tuple(tensor.shape)} is not divisible by TP {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def global_name(local_name: str, layer_offset: int) -> str:
    """``blocks.{i}.rest`` of a pipeline stage whose first layer is ``layer_offset`` ->
    ``blocks.{layer_offset + i}.rest``; other names unchanged."""
    if not local_name.startswith("blocks."):
        return local_name
    index, rest = local_name[len("blocks."):].split(".", 1)
    return f"blocks.{int(index) + layer_offset}.{rest}"


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclass
class NameTable:
    """One model family's table: ``rows``, its source ``formats`` (the first is ``mm_to_hf``'s
    default), ``detect_format(keys)``, and per format the source keys to ignore (``ignored``)."""

    model: str  # in messages, e.g. "Wan"
    rows: list
    formats: tuple[str, ...]
    detect_format: Callable[[Any], str]
    ignored: dict[str, tuple[re.Pattern, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._patterns = [(_pattern(rule.mm), rule) for rule in self.rows]

    def rule_for(self, mm_key: str):
        """The row of an mm key and its placeholder values."""
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
            parts = [tp_shard(source[n], rule.split, tp_size, tp_rank, n) for n in names]
            out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
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
        tp = len(shards)
        for key in filter(is_weight_key, shards[0]):
            rule, values = self.rule_for(key)
            names = [s.format(**values) for s in rule.sources(fmt)]
            pieces = [shard[key].chunk(len(names), dim=0) if len(names) > 1 else (shard[key],) for shard in shards]
            for j, name in enumerate(names):
                per_rank = [p[j] for p in pieces]
                if rule.split is None or tp == 1:
                    out[name] = per_rank[0]
                else:
                    out[name] = torch.cat(per_rank, dim=0 if rule.split == "column" else 1)
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
