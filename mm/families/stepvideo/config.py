"""Architecture hyper-parameters of the Step-Video-T2V DiT (``predictor.model_id: "stepvideodit"``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODEL_ID = "stepvideodit"
# MindSpeed-MM's attention kernel layouts (accepted, not used: mm picks its own kernel layout)
FA_LAYOUTS = ("bsnd", "bnsd", "sbh", "bsh")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_ints(length: int):
    return lambda v: isinstance(v, (list, tuple)) and len(v) == length and all(_is_int(x) for x in v)


# what each JSON key may hold (checked before the dataclass, so a wrong type names its key)
_JSON_TYPES = {
    **{k: (_is_int, "an integer") for k in ("num_layers", "num_heads", "head_dim", "in_channels", "patch_size")},
    "out_channels": (lambda v: v is None or _is_int(v), "an integer or null"),
    **{k: (_is_number, "a number") for k in ("dropout", "norm_eps", "attention_norm_eps", "block_norm_eps",
                                              "rope_theta")},
    **{k: (lambda v: isinstance(v, bool), "true or false") for k in (
        "norm_elementwise_affine", "attention_norm_elementwise_affine", "use_additional_conditions")},
    **{k: (lambda v: isinstance(v, str), "a string") for k in ("norm_type", "attention_norm_type", "fa_layout")},
    "channel_split": (_is_ints(3), "three integers [t, h, w] summing to head_dim"),
    "patch_size_thw": (_is_ints(3), "three integers [1, p, p]"),
    "caption_channels": (lambda v: _is_int(v) or _is_ints(2)(v),
                         "an integer (Step-LLM width) or two [Step-LLM width, CLIP width]"),
}


@dataclass(frozen=True)
class StepVideoDiTConfig:
    """Keys of the model JSON's ``predictor`` section for ``model_id: "stepvideodit"``, MindSpeed-MM's
    names (its ``examples/stepvideo`` JSONs load unchanged), plus mm's ``block_norm_eps`` and
    ``rope_theta``. Defaults are the released 30B model's.

    ``hidden_size = num_heads * head_dim``. ``channel_split``: head channels rotated by frame, row
    and column position (3-D RoPE). ``caption_channels``: the Step-LLM width, or ``[Step-LLM, CLIP]``
    widths (the release: both encoders, the CLIP tokens first in the cross-attention context).
    ``patch_size``: the spatial patch ``p`` (JSON key ``patch_size``, an integer; or
    ``patch_size_thw`` ``[1, p, p]``; no temporal patching); the ``patch_size`` attribute is the
    ``(1, p, p)`` triple the DiT shell reads. ``norm_eps``: the caption norm and the output norm;
    ``block_norm_eps``: each layer's norm1/norm2 (affine LayerNorms); ``attention_norm_eps``: the
    per-head q/k RMSNorms. ``fa_layout`` (MindSpeed-MM's kernel layout) is accepted and not used.
    Fixed by the release and checked: ``norm_type`` "ada_norm_single", ``attention_norm_type``
    "rmsnorm" with affine weights, no affine caption/output norms, ``dropout`` 0 and
    ``use_additional_conditions`` false (Step-Video-TI2V's extra conditioning is not built here).
    """

    num_layers: int
    num_heads: int
    head_dim: int = 128
    channel_split: tuple[int, int, int] = (64, 32, 32)
    in_channels: int = 64
    out_channels: int | None = 64
    patch_size_thw: tuple[int, int, int] = (1, 1, 1)
    caption_channels: int | tuple[int, int] = (6144, 1024)
    dropout: float = 0.0
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    attention_norm_type: str = "rmsnorm"
    attention_norm_elementwise_affine: bool = True
    attention_norm_eps: float = 1e-6
    block_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    fa_layout: str = "bsnd"
    use_additional_conditions: bool = False

    def __post_init__(self) -> None:
        problems = []
        for key in ("num_layers", "num_heads", "head_dim", "in_channels"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                problems.append(f"predictor.{key} = {value!r}; expected a positive integer")
        if self.out_channels is not None and (not _is_int(self.out_channels) or self.out_channels < 1):
            problems.append(f"predictor.out_channels = {self.out_channels!r}; expected a positive integer or null")
        if problems:
            raise ValueError("; ".join(problems))
        split = list(self.channel_split)
        if len(split) != 3 or any(not _is_int(c) or c < 2 or c % 2 for c in split) or sum(split) != self.head_dim:
            problems.append(f"predictor.channel_split = {split}; expected three positive even integers summing to "
                            f"predictor.head_dim = {self.head_dim} (the release: [64, 32, 32] of 128)")
        pt, ph, pw = self.patch_size_thw
        if pt != 1 or ph != pw or ph < 1:
            problems.append(f"predictor.patch_size_thw = {list(self.patch_size_thw)}; Step-Video embeds 2-D "
                            "patches per frame: [1, p, p] with p >= 1 (the release: 1)")
        channels = self.caption_channels
        if (_is_int(channels) and channels < 1) or (not _is_int(channels) and min(channels) < 1):
            problems.append(f"predictor.caption_channels = {channels!r}; expected positive widths")
        fixed = {"norm_type": "ada_norm_single", "attention_norm_type": "rmsnorm", "norm_elementwise_affine": False,
                 "attention_norm_elementwise_affine": True, "use_additional_conditions": False}
        for key, valid in fixed.items():
            if getattr(self, key) != valid:
                problems.append(f"predictor.{key} = {getattr(self, key)!r}; valid: {valid!r} (the released "
                                "Step-Video-T2V DiT's; others are not implemented)")
        if self.dropout != 0.0:
            problems.append(f"predictor.dropout = {self.dropout}; only 0.0 is supported (the release's)")
        for key in ("norm_eps", "attention_norm_eps", "block_norm_eps", "rope_theta"):
            if getattr(self, key) <= 0:
                problems.append(f"predictor.{key} = {getattr(self, key)}; expected a positive number")
        if self.fa_layout not in FA_LAYOUTS:
            problems.append(f"predictor.fa_layout = {self.fa_layout!r}; valid: {list(FA_LAYOUTS)}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def out_dim(self) -> int:
        """Channels of the prediction (``out_channels``, else ``in_channels``)."""
        return self.in_channels if self.out_channels is None else self.out_channels

    def text_to_video_inputs(self) -> tuple[int, tuple[int, ...]]:
        """(latent channels, width of each text context: Step-LLM, then CLIP) of a text-to-video batch."""
        return self.in_channels, (self.llm_channels,) + (() if self.clip_channels is None else (self.clip_channels,))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """(t, h, w) patch: ``(1, p, p)``."""
        return tuple(self.patch_size_thw)

    @property
    def llm_channels(self) -> int:
        """Width of the Step-LLM hidden states."""
        return self.caption_channels if _is_int(self.caption_channels) else self.caption_channels[0]

    @property
    def clip_channels(self) -> int | None:
        """Width of the CLIP hidden states; None when the DiT reads the Step-LLM only."""
        return None if _is_int(self.caption_channels) else self.caption_channels[1]

    @classmethod
    def from_json(cls, params: dict[str, Any]) -> "StepVideoDiTConfig":
        """From the model JSON's predictor keys; unknown keys are an error that lists the valid ones.
        ``patch_size`` (an integer ``p``) and ``patch_size_thw`` (``[1, p, p]``) may both be given
        and must then agree."""
        valid = ({f.name for f in dataclasses.fields(cls)} | {"patch_size"})
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ValueError(f"predictor keys {unknown} are not {MODEL_ID} parameters; valid: {sorted(valid)}")
        missing = [k for k in ("num_layers", "num_heads") if params.get(k) is None]
        if missing:
            raise ValueError("; ".join(f"predictor.{k} is required (a positive integer; the release: 48)"
                                       for k in missing))
        problems = [f"predictor.{k} = {v!r}; expected {_JSON_TYPES[k][1]}" for k, v in params.items()
                    if k in _JSON_TYPES and not _JSON_TYPES[k][0](v)]
        if problems:
            raise ValueError("; ".join(problems))
        values = dict(params)
        patch = values.pop("patch_size", None)
        if "patch_size_thw" in values:
            values["patch_size_thw"] = tuple(values["patch_size_thw"])
            if patch is not None and values["patch_size_thw"] != (1, patch, patch):
                raise ValueError(f"predictor.patch_size = {patch} and predictor.patch_size_thw = "
                                 f"{list(values['patch_size_thw'])} disagree; expected patch_size_thw [1, p, p] "
                                 "for patch_size p")
        elif patch is not None:
            values["patch_size_thw"] = (1, patch, patch)
        for key in ("channel_split", "caption_channels"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)
