"""Pipeline stages of a DiT: which layers each (stage, virtual chunk) holds, and the message that
passes between stages.

Layers: ``predictor.pipeline_num_layers`` gives the layers per stage (``[8, 8, 8, 8]``) or, with
virtual pipelining, per chunk and stage (``[[4, 4, 4, 4], [4, 4, 4, 4]]``). Layers are numbered as
megatron-core interleaves them: chunk 0 of stages 0..P-1, then chunk 1 of stages 0..P-1, and so on.
Without the key, layers are split evenly. ``mm.arguments.pipeline_layout`` reads and checks that value
(the model JSON's key and mm-convert's ``pp_layers`` alike).

Message: megatron-core's schedules send one ``[s, b, h]`` tensor between stages, but a DiT stage
needs more than the hidden states: the timestep embedding and its adaLN projection, the embedded
text (and image) context, the video grid for RoPE, and on the last stage the training target.
``StageMessage`` packs them into one ``[N, b, h]`` tensor in the pipeline dtype: a header of
integers (row counts and sizes), then each tensor's rows. Integers are written as base-256 digits,
which every float dtype (bf16 included) holds exactly. ``N`` changes with the resolution, so the
schedules run with ``variable_seq_lengths`` (shapes are exchanged before each message).
Gradients flow back through the unpacking to every packed tensor that needs one.

A DiT declares its message by field kind (``MessageSpec``): ``Hidden`` for ``[n, b, ..., h]``
tensors (activations, the embedded context, adaLN vectors), ``PerSample`` for ``[b, ...]`` tensors
of any size (masks, the training target: their shape travels in the header), ``Ints`` for integers
(the video grid). ``PipelinedDiT`` (``dit.py``) packs and unpacks with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from mm.arguments.pipeline_layout import KEY, pipeline_layers_problems, pipeline_rows

_DIGITS = 4  # base-256 digits per integer: values < 2**32
_BASE = 256


def layer_layout(num_layers: int, pp: int, vpp: int | None = None,
                 pipeline_num_layers: Sequence | None = None) -> list[list[int]]:
    """Layers per ``[chunk][stage]`` (one chunk without virtual pipelining)."""
    chunks = vpp or 1
    if pipeline_num_layers is None:
        if num_layers % (pp * chunks):
            raise ValueError(f"predictor.num_layers = {num_layers} does not split evenly over {pp} pipeline stages x "
                             f"{chunks} virtual chunk(s); give {KEY}")
        return [[num_layers // (pp * chunks)] * pp for _ in range(chunks)]
    try:
        problems = pipeline_layers_problems(pipeline_num_layers, num_layers, pp, vpp)
    except ValueError as e:
        raise ValueError(f"{KEY} = {list(pipeline_num_layers)}: {e}") from None
    if problems:
        raise ValueError("; ".join(problems))
    return pipeline_rows(pipeline_num_layers)


def stage_span(layout: list[list[int]], stage: int, chunk: int = 0) -> tuple[int, int]:
    """(global index of the first layer, number of layers) of ``chunk`` on pipeline ``stage``."""
    before = sum(sum(row) for row in layout[:chunk]) + sum(layout[chunk][:stage])
    return before, layout[chunk][stage]


def _encode_ints(values: Sequence[int], width: int, batch: int, dtype, device) -> torch.Tensor:
    digits = []
    for v in values:
        if not 0 <= v < _BASE**_DIGITS:
            raise ValueError(f"stage message integer {v} out of range")
        digits += [(v // _BASE**i) % _BASE for i in range(_DIGITS)]
    rows = math.ceil(len(digits) / width)
    flat = torch.zeros(rows * width, dtype=torch.float64)
    flat[: len(digits)] = torch.tensor(digits, dtype=torch.float64)
    return flat.view(rows, 1, width).expand(rows, batch, width).to(device=device, dtype=dtype)


def _decode_ints(header: torch.Tensor, count: int) -> list[int]:
    digits = header[:, 0].reshape(-1)[: count * _DIGITS].detach().double().round().long().tolist()
    return [sum(d * _BASE**i for i, d in enumerate(digits[j * _DIGITS:(j + 1) * _DIGITS])) for j in range(count)]


class StageMessage:
    """Packs named ``[n_i, b, h]`` tensors (``None`` allowed: zero rows) and named integers.

    Both sides construct it with the same ``tensors`` and ``ints`` names; the row count of each
    tensor travels in the header, so the receiver needs nothing else."""

    def __init__(self, tensors: Sequence[str], ints: Sequence[str] = ()):
        self.tensors, self.ints = tuple(tensors), tuple(ints)

    def _header_rows(self, width: int) -> int:
        return math.ceil((len(self.tensors) + len(self.ints)) * _DIGITS / width)

    def pack(self, tensors: dict[str, torch.Tensor | None], ints: dict[str, int], dtype: torch.dtype) -> torch.Tensor:
        present = [t for t in tensors.values() if t is not None]
        batch, width, device = present[0].shape[1], present[0].shape[2], present[0].device
        rows = [0 if tensors[name] is None else tensors[name].shape[0] for name in self.tensors]
        header = _encode_ints(rows + [ints[name] for name in self.ints], width, batch, dtype, device)
        parts = [header] + [tensors[name].to(dtype) for name in self.tensors if tensors[name] is not None]
        for name in self.tensors:
            t = tensors[name]
            if t is not None and t.shape[1:] != (batch, width):
                raise ValueError(f"stage message tensor {name!r} has shape {tuple(t.shape)}; expected [n, {batch}, "
                                 f"{width}]")
        return torch.cat(parts, dim=0)

    def unpack(self, packed: torch.Tensor) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
        width = packed.shape[2]
        head = self._header_rows(width)
        values = _decode_ints(packed[:head], len(self.tensors) + len(self.ints))
        rows, ints = values[: len(self.tensors)], values[len(self.tensors):]
        out, start = {}, head
        for name, n in zip(self.tensors, rows):
            out[name] = packed[start:start + n] if n else None
            start += n
        if start != packed.shape[0]:
            raise ValueError(f"stage message of {packed.shape[0]} rows; its header describes {start}")
        return out, dict(zip(self.ints, ints))


def to_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[b, ...]`` -> ``[n, b, width]`` (zero-padded), to ride in a StageMessage."""
    flat = t.reshape(t.shape[0], -1)
    pad = (-flat.shape[1]) % width
    if pad:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], pad)], dim=1)
    return flat.view(flat.shape[0], -1, width).transpose(0, 1)


def from_rows(rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``to_rows``: ``[n, b, width]`` -> ``[b, *shape]``."""
    flat = rows.transpose(0, 1).reshape(rows.shape[1], -1)
    return flat[:, : math.prod(shape)].reshape(rows.shape[1], *shape)


@dataclass(frozen=True)
class Hidden:
    """A ``[n, b, *inner, h]`` tensor or None; travels as ``[n * prod(inner), b, h]`` rows."""

    inner: tuple[int, ...] = ()


@dataclass(frozen=True)
class PerSample:
    """A ``[b, *shape]`` tensor of at most ``max_dims`` dims after the batch, or None; travels as
    ``to_rows`` rows, its shape as integers."""

    max_dims: int


@dataclass(frozen=True)
class Ints:
    """A tuple of ``count`` integers in ``[0, 2**32)``."""

    count: int


class MessageSpec:
    """A stage message declared by name and kind, e.g. ``MessageSpec({"x": Hidden(), "time_mod":
    Hidden((6,)), "text_mask": PerSample(1), "grid": Ints(3)})``: ``pack`` takes a dict with those
    keys (others are ignored), ``unpack`` gives it back, tensors as views of the message."""

    def __init__(self, fields: Mapping[str, Hidden | PerSample | Ints]):
        self.fields = dict(fields)
        tensors, ints = [], []
        for name, kind in self.fields.items():
            if isinstance(kind, Ints):
                ints += [f"{name}.{i}" for i in range(kind.count)]
                continue
            tensors.append(name)
            if isinstance(kind, PerSample):
                ints += [f"{name}.dims"] + [f"{name}.{i}" for i in range(kind.max_dims)]
        self.message = StageMessage(tensors, ints)

    def pack(self, values: Mapping, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``values[name]`` for every field -> one ``[N, b, width]`` tensor in ``dtype``."""
        tensors, ints = {}, {}
        for name, kind in self.fields.items():
            v = values[name]
            if isinstance(kind, Ints):
                if len(v) != kind.count:
                    raise ValueError(f"stage message integers {name!r} = {v}; expected {kind.count} of them")
                ints.update((f"{name}.{i}", int(n)) for i, n in enumerate(v))
            elif isinstance(kind, Hidden):
                if v is not None and (v.dim() != 3 + len(kind.inner) or tuple(v.shape[2:-1]) != kind.inner):
                    raise ValueError(f"stage message tensor {name!r} has shape {tuple(v.shape)}; expected "
                                     f"[n, b, {', '.join(map(str, kind.inner + (width,)))}]")
                tensors[name] = None if v is None else v.movedim(1, -2).reshape(-1, v.shape[1], width)
            else:
                shape = [] if v is None else list(v.shape[1:])
                if len(shape) > kind.max_dims:
                    raise ValueError(f"stage message tensor {name!r} has shape {tuple(v.shape)}: at most "
                                     f"{kind.max_dims} dims after the batch")
                ints[f"{name}.dims"] = len(shape)
                ints.update((f"{name}.{i}", n) for i, n in enumerate(shape + [0] * (kind.max_dims - len(shape))))
                tensors[name] = None if v is None else to_rows(v, width)
        return self.message.pack(tensors, ints, dtype)

    def unpack(self, packed: torch.Tensor) -> dict:
        """Inverse of ``pack``: ``{name: tensor | None | tuple of ints}``."""
        tensors, ints = self.message.unpack(packed)
        b, width = packed.shape[1], packed.shape[2]
        out = {}
        for name, kind in self.fields.items():
            if isinstance(kind, Ints):
                out[name] = tuple(ints[f"{name}.{i}"] for i in range(kind.count))
                continue
            t = tensors[name]
            if t is None:
                out[name] = None
            elif isinstance(kind, Hidden):
                out[name] = t.reshape(-1, *kind.inner, b, width).movedim(-2, 1)
            else:
                out[name] = from_rows(t, [ints[f"{name}.{i}"] for i in range(ints[f"{name}.dims"])])
        return out
