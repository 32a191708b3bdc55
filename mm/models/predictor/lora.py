"""Low-rank adapters (LoRA) on the tensor-parallel linears of any DiT's layers.

A targeted linear ``y = W x`` becomes ``y = W x + scale * B (A x)`` with ``A [r, in]``, ``B [out, r]``,
``scale = alpha / r``; ``W`` (and every other parameter of the DiT) is frozen. A fused linear (Wan's and
Open-Sora-Plan's self-attention q/k/v, cross-attention k/v) gets one adapter per part, so that each part
is the release's own linear (diffusers' ``to_q``, ``to_k``, ``to_v``) with its own ``A`` and ``B``; a part
left out of ``--lora-target-modules`` gets none.

Parameters live on the linear, named ``<linear>.lora_A.<part>`` and ``<linear>.lora_B.<part>`` (part 0
of an unfused linear); the family's ``NameTable`` derives their release names and TP split from the
linear's row (``name_table.LoraRule``), so checkpoints, resharding and mm-convert treat them as any
other tensor.

Tensor parallelism (``_Adapter``): a column-parallel linear (output split) keeps ``A`` whole and splits
``B`` by output rows as it splits ``W``; ``h = A x`` is the same on every TP rank and its gradient is
summed over TP before it reaches ``A`` and ``x`` (under SP: ``h`` of this rank's tokens, all-gathered,
its gradient reduce-scattered; ``A``'s gradient then covers this rank's tokens and is summed over TP
as a ``sequence_parallel`` parameter). A row-parallel linear (input split) splits ``A`` by input
columns and keeps ``B`` whole; ``h = sum over TP of A_t x_t`` is all-reduced (under SP
reduce-scattered, so ``B`` sees this rank's tokens and is ``sequence_parallel``). The merged weight
``W + scale B A`` of every rank is then its slice of the one-device merge. Context parallelism splits
no linear: adapter gradients are reduced over DP x CP as every other gradient.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

ADAPTER_KEY = re.compile(r"^(?P<linear>.+)\.lora_(?P<matrix>[AB])\.(?P<part>\d+)$")
FLAG = "--lora-target-modules"


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict name is an adapter tensor (``<linear>.lora_A.<part>`` / ``lora_B``)."""
    return ADAPTER_KEY.match(name) is not None


def is_base_key(name: str) -> bool:
    """Whether a state-dict name is a tensor of the base model (not an adapter)."""
    return not is_adapter_key(name)


@dataclass(frozen=True)
class LoraSettings:
    """One run's adapters: rank ``r``, ``alpha`` (scale ``alpha / r``), ``dropout`` on the adapter's
    input (training only) and ``targets``: the layer's linear (its mm path inside a layer, e.g.
    ``self_attention.linear_qkv``) -> the parts adapted (0, 1, 2 = q, k, v of a fused q/k/v)."""

    r: int
    alpha: float
    targets: Mapping[str, tuple[int, ...]]
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint header records (JSON-able; dropout is training's alone)."""
        return {"r": self.r, "alpha": self.alpha, "targets": {k: list(v) for k, v in sorted(self.targets.items())}}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], dropout: float = 0.0) -> LoraSettings:
        return cls(r=int(stored["r"]), alpha=float(stored["alpha"]),
                   targets={k: tuple(int(p) for p in v) for k, v in stored["targets"].items()}, dropout=dropout)

    def same_adapters(self, other: LoraSettings) -> bool:
        """Same shapes and places (alpha and dropout may differ)."""
        return self.r == other.r and dict(self.targets) == dict(other.targets)


@dataclass(frozen=True)
class _Part:
    linear: str  # mm path inside a layer
    index: int
    names: tuple[str, ...]  # every full in-layer name this part answers to (mm's first)


@dataclass
class LoraTargets:
    """What a family's DiT layers offer LoRA: ``linears``, the mm paths inside a layer of its tensor-
    parallel linears (e.g. ``self_attention.linear_qkv``); ``table``, the family's ``NameTable`` (each
    linear's parts and their names in the release formats: diffusers' ``attn1.to_q``, the original
    Wan's ``self_attn.q`` ...); ``aliases``, other tools' names of a linear or part (MindSpeed-MM's
    ``self_attn.proj_q``) -> a name the linears already answer to.

    A ``--lora-target-modules`` name selects every part whose full in-layer name in any of these
    namings is the name or ends with ``.`` + the name (``to_q``: self- and cross-attention's q;
    ``attn1.to_q``: self-attention's alone; ``linear_qkv``: all three parts)."""

    linears: tuple[str, ...]
    table: Any
    aliases: Mapping[str, str] = field(default_factory=dict)
    alias_naming: str = "aliases"  # whose names the aliases are, for messages

    def __post_init__(self) -> None:
        parts = []
        for linear in self.linears:
            rule, _ = self.table.rule_for(f"blocks.0.{linear}.weight")
            for index in range(rule.fused_parts):
                names = [linear]
                for fmt in self.table.formats:
                    source = rule.sources(fmt)[index]
                    inner = source.split("{i}.", 1)[-1]
                    names.append(inner[:-len(".weight")] if inner.endswith(".weight") else inner)
                names += [alias for alias, meant in self.aliases.items() if meant in names]
                parts.append(_Part(linear, index, tuple(dict.fromkeys(names))))
        self.parts = parts

    def every(self) -> dict[str, tuple[int, ...]]:
        """Every part of every linear (the default targets)."""
        return self._collect(self.parts)

    @staticmethod
    def _collect(parts: Sequence[_Part]) -> dict[str, tuple[int, ...]]:
        out: dict[str, set[int]] = {}
        for part in parts:
            out.setdefault(part.linear, set()).add(part.index)
        return {linear: tuple(sorted(indices)) for linear, indices in out.items()}

    def matching(self, name: str) -> list[_Part]:
        return [p for p in self.parts if any(n == name or n.endswith("." + name) for n in p.names)]

    def valid_names(self) -> str:
        """The full in-layer names, by naming (for error messages)."""
        namings = {"mm": [p.names[0] for p in self.parts]}
        for i, fmt in enumerate(self.table.formats):
            namings[fmt] = [p.names[1 + i] if len(p.names) > 1 + i else "" for p in self.parts]
        namings[self.alias_naming] = list(self.aliases)
        return "; ".join(f"{naming}: {', '.join(dict.fromkeys(n for n in names if n))}"
                         for naming, names in namings.items() if any(names))

    def resolve(self, names: Sequence[str] | None, problems: list[str], model: str) -> dict[str, tuple[int, ...]]:
        """``--lora-target-modules`` -> targets (linear -> parts); a name that selects nothing is a
        problem naming the flag, the value and the valid names. None: every linear."""
        if not names:
            return self.every()
        chosen, unknown = [], []
        for name in names:
            found = self.matching(name)
            if not found:
                unknown.append(name)
            chosen.extend(found)
        if unknown:
            problems.append(f"{FLAG} {' '.join(unknown)}: no linear of {model}'s layers has "
                            f"{'this name' if len(unknown) == 1 else 'these names'}; valid: a layer linear's name or "
                            f"its trailing part (e.g. {self.parts[0].names[0].split('.')[-1]}) in any of these "
                            f"namings: {self.valid_names()}")
        return self._collect(chosen)


# ------------------------------------------------------------------------------------------ the adapter


def _init_generator(seed: int, layer: int, linear: str, part: int) -> torch.Generator:
    """The same A for a (layer, linear, part) under every layout: TP ranks slice one full draw."""
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 1_000_003 + zlib.crc32(f"{linear}.{part}".encode()))


class _Adapter:
    """The forward hook adding ``scale * B (A x)`` to a column- or row-parallel linear's output."""

    def __init__(self, linear: torch.nn.Module, kind: str, parts: tuple[int, ...], total_parts: int, r: int,
                 scale: float, dropout: float):
        self.kind, self.parts, self.total_parts, self.r = kind, parts, total_parts, r
        self.scale, self.dropout = scale, dropout
        self.sequence_parallel = bool(getattr(linear, "sequence_parallel", False))
        self.group = getattr(linear, "tp_group", None)
        self.tp = 1 if self.group is None else self.group.size()
        self.linear = linear

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.dropout and self.linear.training):
            return x
        if self.kind == "row" or self.sequence_parallel:  # this rank's own features or tokens: its own mask
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.dropout(x, self.dropout, True)
        return F.dropout(x, self.dropout, True)  # the same input on every TP rank: the same mask

    def __call__(self, module: torch.nn.Module, args: tuple, output):
        out, bias = output
        x = self._dropped(args[0])
        a = [module.lora_A[str(p)] for p in self.parts]
        b = [module.lora_B[str(p)] for p in self.parts]
        if self.kind == "column":
            h = F.linear(x, a[0] if len(a) == 1 else torch.cat(a))  # [s', b, n * r]
            if self.tp > 1:
                h = (tensor_parallel.gather_from_sequence_parallel_region(h, True, self.group)
                     if self.sequence_parallel else tensor_parallel.copy_to_tensor_model_parallel_region(h, self.group))
            pieces = h.split(self.r, dim=-1)
            width = out.shape[-1] // self.total_parts
            deltas = {p: F.linear(piece, weight) for p, piece, weight in zip(self.parts, pieces, b)}
            if self.total_parts == 1:
                delta = deltas[0]
            else:  # the fused output holds this rank's slice of each part in turn; a part without adapter adds 0
                delta = torch.cat([deltas[p] if p in deltas else out.new_zeros(*out.shape[:-1], width)
                                   for p in range(self.total_parts)], dim=-1)
        else:
            h = F.linear(x, a[0])  # this rank's share of the sum, [s, b, r]
            if self.tp > 1:
                h = (tensor_parallel.reduce_scatter_to_sequence_parallel_region(h, self.group)
                     if self.sequence_parallel else tensor_parallel.reduce_from_tensor_model_parallel_region(h, self.group))
            delta = F.linear(h, b[0])
        return out + self.scale * delta, bias


def _kind(linear: torch.nn.Module) -> str:
    if isinstance(linear, tensor_parallel.ColumnParallelLinear):
        return "column"
    if isinstance(linear, tensor_parallel.RowParallelLinear):
        return "row"
    raise TypeError(f"{type(linear).__name__} is not a tensor-parallel linear: LoRA adapts column- and "
                    "row-parallel linears")


def add_adapters(model: torch.nn.Module, settings: LoraSettings, seed: int, part_counts: Mapping[str, int],
                 train: bool = True) -> int:
    """Freeze every parameter of ``model`` (one pipeline stage of a DiT: ``blocks``, ``layer_offset``)
    and add the adapters of ``settings`` to its layers' linears; ``part_counts``: how many parts each
    targeted linear fuses (the family's ``LoraTargets``). ``A`` is drawn as torch's Linear draws its
    weight (uniform in +-1/sqrt(in), kaiming-uniform with a = sqrt(5)) from ``seed``, the global layer,
    the linear and the part, the same under every layout; ``B`` is zero, so the adapted model starts as
    the base. ``train`` False: the adapters are frozen too (inference). Returns the number of linears
    adapted; a stage where no targeted linear exists is a ValueError naming --lora-target-modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = 0
    offset = getattr(model, "layer_offset", 0)
    for i, block in enumerate(model.blocks):
        for linear_name, parts in settings.targets.items():
            try:
                linear = block.get_submodule(linear_name)
            except AttributeError:
                continue  # a linear this variant lacks (Wan's image k/v without an image branch)
            _attach(linear, linear_name, parts, part_counts[linear_name], settings, seed, offset + i, train)
            adapted += 1
    if not adapted:
        raise ValueError(f"{FLAG}: none of {sorted(settings.targets)} is a linear of this DiT's layers")
    return adapted


def _attach(linear, linear_name: str, parts: tuple[int, ...], total: int, settings: LoraSettings, seed: int,
            layer: int, train: bool) -> None:
    kind = _kind(linear)
    weight = linear.weight
    out_local, in_local = weight.shape
    tp = 1 if getattr(linear, "tp_group", None) is None else linear.tp_group.size()
    rank = 0 if tp == 1 else linear.tp_group.rank()
    in_full = in_local * tp if kind == "row" else in_local
    r = settings.r
    lora_a, lora_b = torch.nn.ParameterDict(), torch.nn.ParameterDict()
    for part in parts:
        bound = 1.0 / math.sqrt(in_full)
        full = torch.empty(r, in_full).uniform_(-bound, bound, generator=_init_generator(seed, layer, linear_name, part))
        a = full.chunk(tp, dim=1)[rank] if kind == "row" else full
        b = torch.zeros(out_local // total if kind == "column" else out_local, r)
        a = torch.nn.Parameter(a.to(weight.device, weight.dtype).contiguous(), requires_grad=train)
        b = torch.nn.Parameter(b.to(weight.device, weight.dtype), requires_grad=train)
        split, replicated = (b, a) if kind == "column" else (a, b)
        tensor_parallel.set_tensor_model_parallel_attributes(split, True, 0 if kind == "column" else 1, 1)
        # a replicated matrix that sees this rank's tokens only: its gradient is summed over TP (finalize_model_grads)
        replicated.sequence_parallel = bool(getattr(linear, "sequence_parallel", False)) and tp > 1
        lora_a[str(part)], lora_b[str(part)] = a, b
    linear.lora_A, linear.lora_B = lora_a, lora_b
    linear.register_forward_hook(_Adapter(linear, kind, tuple(parts), total, r, settings.scale, settings.dropout))


def merged(weight_parts: Sequence[torch.Tensor], adapters: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
           scale: float) -> list[torch.Tensor]:
    """A linear's full (unsplit) weight parts with their adapters merged: ``W_p + scale * B_p @ A_p``
    for every part ``p`` with ``adapters[p] = (A_p, B_p)``, computed in fp64, in the weight's dtype."""
    out = []
    for p, w in enumerate(weight_parts):
        if p in adapters:
            a, b = adapters[p]
            w = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
        out.append(w)
    return out
