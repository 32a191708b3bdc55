"""Architecture hyper-parameters of the Open-Sora-Plan v1.3 DiT (T2V and I2V/inpaint)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# the v1.3 layer pattern (hard-wired in the reference): layers 0-1 and 30-31 attend densely, the
# ones between use the sparse 1-D pattern when ``sparse1d``; odd layers group by blocks of
# ``sparse_n`` tokens, even ones by stride
SPARSE_LAYERS = range(2, 30)
ACTIVATIONS = ("gelu-approximate",)
FA_LAYOUTS = ("sbh", "bsh", "bnsd")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_list(check, length: int):
    return lambda v: isinstance(v, (list, tuple)) and len(v) == length and all(check(x) for x in v)


# what each JSON key may hold (checked before the dataclass, so a wrong type names its key)
_JSON_TYPES = {
    **{k: (_is_int, "an integer") for k in ("num_layers", "num_heads", "head_dim", "in_channels", "caption_channels",
                                              "sparse_n", "vae_scale_factor_t")},
    **{k: (lambda v: v is None or _is_int(v), "an integer or null") for k in ("out_channels", "cross_attention_dim")},
    **{k: (lambda v: isinstance(v, bool), "true or false") for k in (
        "attention_q_bias", "attention_k_bias", "attention_v_bias", "norm_elementwise_affine", "sparse1d")},
    **{k: (_is_number, "a number") for k in ("dropout", "norm_eps", "rope_theta")},
    **{k: (lambda v: isinstance(v, str), "a string") for k in ("fa_layout", "activation_fn")},
    "patch_size_thw": (_is_list(_is_int, 3), "three integers [t, h, w]"),
    "interpolation_scale": (_is_list(_is_number, 3), "three numbers [t, h, w]"),
}


@dataclass(frozen=True)
class OpenSoraPlanDiTConfig:
    """Keys of the model JSON's ``predictor`` section for ``model_id: "videoditsparse"`` (T2V) and
    ``"videoditsparsei2v"`` (I2V: ``vae_scale_factor_t`` set), MindSpeed-MM's names (seed 003).

    ``hidden_size = num_heads * head_dim``; ``cross_attention_dim`` must equal it (the caption
    projection maps mT5 features to the hidden size). ``in_channels`` are the noisy latent's
    channels; the I2V model also reads as many masked-video channels and ``vae_scale_factor_t``
    mask channels. ``interpolation_scale`` divides the (t, h, w) RoPE positions. ``fa_layout`` is
    the attention kernel layout of MindSpeed-MM (accepted; mm picks its own).
    """

    num_layers: int
    num_heads: int
    head_dim: int = 96
    in_channels: int = 8
    out_channels: int | None = None
    dropout: float = 0.0
    cross_attention_dim: int | None = None
    attention_q_bias: bool = True
    attention_k_bias: bool = True
    attention_v_bias: bool = True
    fa_layout: str = "sbh"
    patch_size_thw: tuple[int, int, int] = (1, 2, 2)
    activation_fn: str = "gelu-approximate"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 4096
    interpolation_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sparse1d: bool = False
    sparse_n: int = 2
    vae_scale_factor_t: int | None = None
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        problems = []
        for key in ("num_layers", "num_heads", "head_dim", "in_channels", "caption_channels", "sparse_n"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"predictor.{key} = {value!r}; expected a positive integer")
        if problems:
            raise ValueError("; ".join(problems))
        if self.head_dim % 6:
            problems.append(f"predictor.head_dim = {self.head_dim}: 3-D RoPE needs a multiple of 6 (three even parts)")
        if self.cross_attention_dim is not None and self.cross_attention_dim != self.hidden_size:
            problems.append(f"predictor.cross_attention_dim = {self.cross_attention_dim}; must equal num_heads x "
                            f"head_dim = {self.hidden_size} (the caption projection's output)")
        if len(self.patch_size_thw) != 3 or self.patch_size_thw[0] != 1 or self.patch_size_thw[1] != \
                self.patch_size_thw[2] or self.patch_size_thw[1] < 1:
            problems.append(f"predictor.patch_size_thw = {list(self.patch_size_thw)}; v1.3 embeds 2-D patches: "
                            "[1, p, p] with p >= 1")
        biases = (self.attention_q_bias, self.attention_k_bias, self.attention_v_bias)
        if len(set(biases)) != 1:
            problems.append(f"predictor.attention_q_bias / attention_k_bias / attention_v_bias = {list(biases)}; "
                            "q, k and v are one fused projection here: all true or all false")
        if self.activation_fn not in ACTIVATIONS:
            problems.append(f"predictor.activation_fn = {self.activation_fn!r}; valid: {list(ACTIVATIONS)}")
        if self.fa_layout not in FA_LAYOUTS:
            problems.append(f"predictor.fa_layout = {self.fa_layout!r}; valid: {list(FA_LAYOUTS)}")
        if self.dropout != 0.0:
            problems.append(f"predictor.dropout = {self.dropout}; only 0.0 is supported (the released models')")
        if len(self.interpolation_scale) != 3 or any(s <= 0 for s in self.interpolation_scale):
            problems.append(f"predictor.interpolation_scale = {list(self.interpolation_scale)}; expected three "
                            "positive numbers [t, h, w]")
        if self.vae_scale_factor_t is not None and self.vae_scale_factor_t < 1:
            problems.append(f"predictor.vae_scale_factor_t = {self.vae_scale_factor_t}; expected a positive integer")
        if problems:
            raise ValueError("; ".join(problems))

    def text_to_video_inputs(self) -> tuple[int, tuple[int, ...]]:
        """(latent channels, width of each text context) of a text-to-video batch (``mm-plan calibrate``)."""
        return self.in_channels, (self.caption_channels,)

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def out_dim(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.patch_size_thw)

    @property
    def is_i2v(self) -> bool:
        return self.vae_scale_factor_t is not None

    @property
    def input_channels(self) -> int:
        """Channels of the latent input: noisy latents, and for I2V masked video and mask."""
        return 2 * self.in_channels + self.vae_scale_factor_t if self.is_i2v else self.in_channels

    def layer_sparsity(self, layer: int) -> tuple[int, bool]:
        """(sparse_n, block groups?) of global layer ``layer``; sparse_n 1 is dense attention."""
        return (self.sparse_n if self.sparse1d and layer in SPARSE_LAYERS else 1), layer % 2 == 1

    @classmethod
    def from_json(cls, params: dict[str, Any]) -> "OpenSoraPlanDiTConfig":
        """From the model JSON's predictor keys; unknown keys are an error that lists the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)} - {"vae_scale_factor_t"}
        if cls is OpenSoraPlanI2VConfig:
            valid.add("vae_scale_factor_t")
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ValueError(f"predictor keys {unknown} are not {cls.model_id()} parameters; valid: {sorted(valid)}")
        problems = [f"predictor.{k} = {v!r}; expected {_JSON_TYPES[k][1]}" for k, v in params.items()
                    if not _JSON_TYPES[k][0](v)]
        if problems:
            raise ValueError("; ".join(problems))
        values = dict(params)
        for key in ("patch_size_thw", "interpolation_scale"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @staticmethod
    def model_id() -> str:
        return "videoditsparse"


@dataclass(frozen=True)
class OpenSoraPlanI2VConfig(OpenSoraPlanDiTConfig):
    """``model_id: "videoditsparsei2v"``: the inpainting DiT, conditioned on a masked video and its mask."""

    vae_scale_factor_t: int | None = 4

    def __post_init__(self) -> None:
        if self.vae_scale_factor_t is None:
            raise ValueError("predictor.vae_scale_factor_t = None; the I2V DiT needs its mask channels (e.g. 4)")
        super().__post_init__()

    @staticmethod
    def model_id() -> str:
        return "videoditsparsei2v"
