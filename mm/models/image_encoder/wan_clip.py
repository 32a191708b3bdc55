"""Wan2.1's image encoder release file, ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, as a
transformers ``CLIPVisionModel``.

The file is ``torch.save`` of the flat state dict of Wan's ``XLMRobertaCLIP`` (``wan/modules/clip.py``,
``clip_xlm_roberta_vit_h_14``): the vision tower ``visual.*`` (a ``VisionTransformer``), the text tower
``textual.*`` and the logit scale ``log_scale``. Wan's I2V / FLF2V use the vision tower only, and only
up to its last-but-one block (``use_31_block``); here its weights become a ``CLIPVisionModel``, whose
``hidden_states[-2]`` is that output. The text tower and ``log_scale`` are skipped (counted in the
loaded model's ``wan_clip_note``).

The tower is the same computation in both: a bias-free patch convolution, a class token, learnt
position embeddings, a LayerNorm before the blocks (Wan's ``pre_norm``), pre-norm blocks (LayerNorm,
self-attention with a fused q/k/v projection, LayerNorm, a two-layer MLP with exact GELU) and a
LayerNorm after them (``post_norm``, which Wan's ``VisionTransformer`` always builds, whatever its
``post_norm`` flag says, and never applies; transformers applies it to the pooled class token only).
``visual.head``, the projection into the joint image-text space, has no place in a
``CLIPVisionModel``: its transformers name is ``CLIPVisionModelWithProjection``'s
``visual_projection.weight`` (transposed), which the mapping both ways carries and the loader leaves
out (Wan never applies it either). Nothing transformers builds is missing from Wan's tower, so no
piece is set to the identity.

Every configuration value is read from the tensors, except those Wan's code fixes
(``clip_xlm_roberta_vit_h_14``): activation ``gelu`` (``nn.GELU()``, exact, not ``quick_gelu``),
LayerNorm eps 1e-5, and the head count, which no tensor holds: ``num_heads`` (the model JSON's
``image_encoder.num_heads``), else ``width // 80`` (ViT-H/14's head width: 16 heads of 80 in 1280).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mm.models.release_file import UnreadableFile, read_state_dict

PREFIX = "visual."
SKIPPED_PREFIXES = ("textual.",)  # the text tower
SKIPPED_KEYS = ("log_scale",)  # the contrastive logit scale
HEAD_WIDTH = 80  # ViT-H/14: width 1280, 16 heads
LAYER_NORM_EPS = 1e-5  # Wan's VisionTransformer default (norm_eps), kept by clip_xlm_roberta_vit_h_14
HIDDEN_ACT = "gelu"  # clip_xlm_roberta_vit_h_14: activation='gelu' -> nn.GELU() (erf)
PROJECTION = "visual_projection.weight"  # CLIPVisionModelWithProjection's name of visual.head (transposed)
KEY = "image_encoder.from_pretrained"
HEADS_KEY = "image_encoder.num_heads"


@dataclass(frozen=True)
class Row:
    """One tensor of Wan's tower (``original``, under ``visual.``; ``{i}`` a block number) and its
    transformers name(s) (``hf``: several are the parts of a fused tensor, along dim 0, in order).
    ``kind``: ``copy``; ``token`` (``[1, 1, w]`` <-> ``[w]``); ``table`` (``[1, n, w]`` <-> ``[n, w]``);
    ``fused`` (split along dim 0 <-> concatenated); ``transpose``."""

    original: str
    hf: tuple[str, ...]
    kind: str = "copy"


def _layer(original: str, hf: str | tuple[str, ...], kind: str = "copy") -> Row:
    hf = (hf,) if isinstance(hf, str) else hf
    return Row(f"transformer.{{i}}.{original}", tuple(f"encoder.layers.{{i}}.{h}" for h in hf), kind)


WAN_CLIP_NAME_TABLE: tuple[Row, ...] = (
    Row("patch_embedding.weight", ("embeddings.patch_embedding.weight",)),
    Row("cls_embedding", ("embeddings.class_embedding",), "token"),
    Row("pos_embedding", ("embeddings.position_embedding.weight",), "table"),
    Row("pre_norm.weight", ("pre_layrnorm.weight",)),
    Row("pre_norm.bias", ("pre_layrnorm.bias",)),
    *(_layer(f"norm{n}.{p}", f"layer_norm{n}.{p}") for n in (1, 2) for p in ("weight", "bias")),
    *(_layer(f"attn.to_qkv.{p}", tuple(f"self_attn.{x}_proj.{p}" for x in "qkv"), "fused") for p in ("weight", "bias")),
    *(_layer(f"attn.proj.{p}", f"self_attn.out_proj.{p}") for p in ("weight", "bias")),
    *(_layer(f"mlp.0.{p}", f"mlp.fc1.{p}") for p in ("weight", "bias")),
    *(_layer(f"mlp.2.{p}", f"mlp.fc2.{p}") for p in ("weight", "bias")),
    Row("post_norm.weight", ("post_layernorm.weight",)),
    Row("post_norm.bias", ("post_layernorm.bias",)),
    Row("head", (PROJECTION,), "transpose"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_ORIGINAL = [(_pattern(r.original), r) for r in WAN_CLIP_NAME_TABLE]
_HF = [(_pattern(h), r, j) for r in WAN_CLIP_NAME_TABLE for j, h in enumerate(r.hf)]


def _to_hf(kind: str, tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    if kind == "token":
        return [tensor.reshape(tensor.shape[-1])]
    if kind == "table":
        return [tensor.reshape(tensor.shape[-2], tensor.shape[-1])]
    if kind == "fused":
        if tensor.shape[0] % parts:
            raise ValueError(f"dim 0 of shape {list(tensor.shape)} is not {parts} equal parts")
        return list(tensor.chunk(parts, dim=0))
    if kind == "transpose":
        return [tensor.t()]
    return [tensor]


def _to_original(kind: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if kind == "token":
        return tensors[0].reshape(1, 1, -1)
    if kind == "table":
        return tensors[0].unsqueeze(0)
    if kind == "fused":
        return torch.cat(tensors, dim=0)
    if kind == "transpose":
        return tensors[0].t()
    return tensors[0]


def original_to_clip_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's tower (``visual.*`` keys; other keys are ignored) -> transformers names: a
    ``CLIPVisionModel`` state dict, plus ``visual_projection.weight`` when ``visual.head`` is there. The
    tensors are views of the given ones (split, reshaped or transposed). A ``visual.*`` key outside the
    name table is an error listing every such key."""
    out, strangers = {}, []
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        for pattern, row in _ORIGINAL:
            m = pattern.match(name)
            if m:
                names = [h.format(**m.groupdict()) for h in row.hf]
                try:
                    out.update(zip(names, _to_hf(row.kind, tensor, len(names))))
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
                break
        else:
            strangers.append(key)
    if strangers:
        raise ValueError(f"tensors that Wan's CLIP vision tower has not ({len(strangers)}): "
                         f"{', '.join(sorted(strangers)[:20])}")
    return out


def clip_vision_state_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPVisionModel`` state dict (transformers 5 names, or with the ``vision_model.`` prefix of
    transformers 4, diffusers' files and ``CLIPVisionModelWithProjection``; ``visual_projection.weight``
    too when present) -> Wan's release names (``visual.*``), the fused q/k/v joined again. Keys outside
    the name table and incomplete fused triples are errors listing them."""
    groups: dict[tuple[Row, str | None], dict[int, torch.Tensor]] = {}
    strangers = []
    for key, tensor in state_dict.items():
        name = key.removeprefix("vision_model.")
        for pattern, row, part in _HF:
            m = pattern.match(name)
            if m:
                groups.setdefault((row, m.groupdict().get("i")), {})[part] = tensor
                break
        else:
            strangers.append(key)
    if strangers:
        raise ValueError(f"tensors outside a CLIP vision model ({len(strangers)}): {', '.join(sorted(strangers)[:20])}")
    out, incomplete = {}, []
    for (row, i), parts in groups.items():
        name = PREFIX + row.original.format(i=i)
        if len(parts) != len(row.hf):
            incomplete.append(f"{name} (has {', '.join(row.hf[j].format(i=i) for j in sorted(parts))})")
            continue
        out[name] = _to_original(row.kind, [parts[j] for j in range(len(row.hf))])
    if incomplete:
        raise ValueError(f"fused tensors with parts missing: {'; '.join(sorted(incomplete))}")
    return out


def _visual(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(PREFIX)}


def default_num_heads(width: int, heads_key: str = HEADS_KEY) -> int:
    """``width // 80`` (ViT-H/14's head width); an error naming ``heads_key`` when ``width`` is not a
    multiple of 80."""
    if width % HEAD_WIDTH:
        raise ValueError(f"the CLIP vision tower's width {width} is not a multiple of {HEAD_WIDTH} (ViT-H/14's head "
                         f"width), so its head count cannot be assumed: set {heads_key} (a divisor of {width})")
    return width // HEAD_WIDTH


def clip_vision_config_from_original(state: dict[str, torch.Tensor], num_heads: int | None = None,
                                     heads_key: str = HEADS_KEY):
    """The ``CLIPVisionConfig`` of Wan's tower in ``state`` (release names, ``visual.*``; meta tensors
    will do): patch size, channels and width from ``visual.patch_embedding.weight``, the image size
    from the position count (``(size / patch)^2 + 1``), the layers from ``visual.transformer.N``, the
    MLP width from ``mlp.0``, ``projection_dim`` from ``visual.head``; ``gelu``, eps 1e-5 and the head
    count as the module docstring says (errors about it name ``heads_key``)."""
    from transformers import CLIPVisionConfig

    visual = _visual(state)
    needed = [f"{PREFIX}{k}" for k in ("patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight",
                                       "head")]
    missing = [k for k in needed if k not in visual]
    if missing:
        raise ValueError(f"not Wan's CLIP vision tower: no {', '.join(missing)}")
    patch = visual[f"{PREFIX}patch_embedding.weight"]
    if patch.dim() != 4 or patch.shape[2] != patch.shape[3]:
        raise ValueError(f"{PREFIX}patch_embedding.weight has shape {list(patch.shape)}; expected [width, channels, "
                         "patch, patch]")
    width, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    positions = visual[f"{PREFIX}pos_embedding"].shape
    grid = math.isqrt(max(positions[-2] - 1, 0)) if len(positions) == 3 else 0
    if grid < 1 or positions[-1] != width or grid * grid + 1 != positions[-2]:
        raise ValueError(f"{PREFIX}pos_embedding has shape {list(positions)}; expected [1, grid^2 + 1, {width}] "
                         "(a class token and a square grid of patches)")
    layers = 1 + max(int(m.group(1)) for k in visual if (m := re.match(r"visual\.transformer\.(\d+)\.", k)))
    if num_heads is None:
        num_heads = default_num_heads(width, heads_key)
    elif isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
        raise ValueError(f"{heads_key} = {num_heads!r}; valid: a divisor of the tower's width {width}")
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=visual[f"{PREFIX}transformer.0.mlp.0.weight"].shape[0],
        projection_dim=visual[f"{PREFIX}head"].shape[-1], num_hidden_layers=layers, num_attention_heads=num_heads,
        num_channels=channels, image_size=grid * patch_size, patch_size=patch_size, hidden_act=HIDDEN_ACT,
        layer_norm_eps=LAYER_NORM_EPS, attention_dropout=0.0)


def expected_original_shapes(config) -> dict[str, list[int]]:
    """Every ``visual.*`` tensor of the release a ``CLIPVisionModel`` of ``config`` holds, with
    ``visual.head``, and their shapes (the model built on the meta device)."""
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        state = dict(CLIPVisionModel(config).state_dict())
        state[PROJECTION] = torch.empty(config.projection_dim, config.hidden_size)
    return {k: list(v.shape) for k, v in clip_vision_state_to_original(state).items()}


def skipped_note(state: dict) -> str:
    """What of the release file a vision model leaves out, in words."""
    text = sum(1 for k in state if k.startswith(SKIPPED_PREFIXES))
    others = sorted(k for k in state if k in SKIPPED_KEYS)
    parts = [f"{text} textual.* tensors (the text tower)"] + others
    head = f"{PREFIX}head (the image-text projection; unused by Wan's I2V)" if f"{PREFIX}head" in state else None
    return "skipped " + ", ".join(parts + ([head] if head else []))


def check_release_state(state: dict, config, key: str = KEY, path: str = "") -> str:
    """Every tensor a tower of ``config`` has, with its shape, and nothing else besides the skipped
    ``textual.*`` / ``log_scale``: missing, unexpected and misshapen tensors in one error naming
    ``key``. Returns the skip note."""
    expected = expected_original_shapes(config)
    skipped = [k for k in state if k.startswith(SKIPPED_PREFIXES) or k in SKIPPED_KEYS]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(skipped))
    misshapen = [f"{k}: {list(state[k].shape)}, expected {expected[k]}" for k in sorted(expected)
                 if k in state and list(state[k].shape) != expected[k]]
    if missing or unexpected or misshapen:
        problems = [f"{what} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
        raise ValueError(f"{key} = {path!r}: the tensors do not match Wan's CLIP vision tower "
                         f"({config.num_hidden_layers} blocks, width {config.hidden_size}):\n  "
                         + "\n  ".join(problems))
    return skipped_note(state)


def read_release_file(path: str | Path, key: str = KEY) -> dict[str, torch.Tensor]:
    """The release file's flat state dict, memory-mapped, without running pickled code
    (``mm.models.release_file``); an unreadable file is an ``UnreadableFile`` naming ``key`` and the path."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key} = {str(path)!r}: no such file")
    return read_state_dict(path, key, "Wan's models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")


def load_wan_clip_vision(path: str | Path, dtype: torch.dtype | None = torch.float32, num_heads: int | None = None,
                         key: str = KEY, heads_key: str = HEADS_KEY):
    """A ``CLIPVisionModel`` in ``dtype`` (None: the file's) holding the vision tower of Wan's release
    file ``path`` (errors name ``key`` and ``heads_key``; an unreadable file is a ``UnreadableFile``);
    its ``wan_clip_note`` attribute says what was skipped."""
    from transformers import CLIPVisionModel

    state = read_release_file(path, key)
    try:
        config = clip_vision_config_from_original(state, num_heads, heads_key)
        note = check_release_state(state, config, key, str(path))
        hf_state = original_to_clip_vision_state(state)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(key) else f"{key} = {str(path)!r}: {message}") from None
    hf_state.pop(PROJECTION, None)
    dtype = dtype or hf_state["embeddings.patch_embedding.weight"].dtype
    model = CLIPVisionModel.from_pretrained(None, config=config, state_dict=hf_state, dtype=dtype)
    model.wan_clip_note = note
    return model
