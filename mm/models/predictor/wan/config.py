"""Architecture hyper-parameters of a Wan DiT (Wan2.1 T2V/I2V/FLF2V, Wan2.2 A14B experts, TI2V-5B)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WanDiTConfig:
    """Keys of the model JSON's ``predictor`` section for ``model_id: "wan_dit"``.

    The names follow the original Wan release (``in_dim``, ``dim`` -> ``hidden_size``, ``ffn_dim``,
    ``freq_dim``, ``text_dim``, ``num_heads``, ``num_layers``); ``image_dim`` set means the CLIP
    image cross-attention of Wan2.1 I2V/FLF2V, ``pos_embed_seq_len`` the FLF2V image position
    embedding. Wan2.2 I2V-A14B has no image branch: it concatenates the condition to the latents
    (``in_dim`` 36).
    """

    num_layers: int
    num_heads: int
    hidden_size: int
    ffn_dim: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    image_dim: int | None = None
    pos_embed_seq_len: int | None = None
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    # text tokens the DiT reads: a shorter context is padded with zeros to this length before the text
    # embedding, as Wan's release pads to its text_len (None: the context as given)
    text_len: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"predictor.hidden_size = {self.hidden_size} is not divisible by "
                            f"predictor.num_heads = {self.num_heads}")
        elif self.head_dim % 2 or self.head_dim < 6:
            problems.append(f"head dim {self.head_dim} (hidden_size / num_heads) must be even and >= 6 for 3-D RoPE")
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            problems.append(f"predictor.patch_size = {list(self.patch_size)}; expected three positive ints [t, h, w]")
        if self.text_len is not None and self.text_len < 1:
            problems.append(f"predictor.text_len = {self.text_len}; valid: >= 1 (the text tokens the DiT reads)")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            problems.append("predictor.pos_embed_seq_len needs predictor.image_dim (the FLF2V image branch)")
        if problems:
            raise ValueError("; ".join(problems))

    def text_to_video_inputs(self) -> tuple[int, tuple[int, ...]]:
        """(latent channels, width of each text context) of a text-to-video batch (``mm-plan calibrate``)."""
        return self.in_dim, (self.text_dim,)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim channels rotated by frame, row and column position."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    @classmethod
    def from_json(cls, params: dict[str, Any]) -> "WanDiTConfig":
        """From the model JSON's predictor keys; unknown keys are an error that lists the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ValueError(f"predictor keys {unknown} are not Wan DiT parameters; valid: {sorted(valid)}")
        values = dict(params)
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        return cls(**values)
