"""Wan DiT weight names: one declarative table between mm's keys, diffusers' and the original
Wan release's, plus the tensor-parallel split of each tensor.

Each row: mm key, diffusers key(s), original key(s), and how TP splits it ("column": dim 0 per
rank, "row": dim 1 per rank, None: replicated). A row with several source keys fuses them: mm's
TP rank r holds the concatenation of rank r's slice of each (so a fused q/k/v shard holds that
rank's heads of q, k and v). ``{i}`` stands for a layer number. Used by ``load_hf_weights`` now
and by mm-convert for sharding and merging.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FORMATS = ("diffusers", "original")


@dataclass(frozen=True)
class Rule:
    mm: str
    diffusers: tuple[str, ...]
    original: tuple[str, ...]
    split: str | None  # "column", "row" or None

    def sources(self, fmt: str) -> tuple[str, ...]:
        return self.diffusers if fmt == "diffusers" else self.original

    @property
    def fused_parts(self) -> int:
        """How many source tensors this mm tensor fuses (self-attention q/k/v: 3)."""
        return len(self.diffusers)


def _linear(mm: str, diffusers, original, split: str | None) -> list[Rule]:
    """Weight and bias rows of one linear/conv layer. A row-parallel bias is replicated."""
    diffusers = (diffusers,) if isinstance(diffusers, str) else tuple(diffusers)
    original = (original,) if isinstance(original, str) else tuple(original)
    return [Rule(f"{mm}.{p}", tuple(f"{d}.{p}" for d in diffusers), tuple(f"{o}.{p}" for o in original),
                 split if (p == "weight" or split == "column") else None) for p in ("weight", "bias")]


def _norm(mm: str, diffusers: str, original: str, split: str | None = None, bias: bool = False) -> list[Rule]:
    params = ("weight", "bias") if bias else ("weight",)
    return [Rule(f"{mm}.{p}", (f"{diffusers}.{p}",), (f"{original}.{p}",), split) for p in params]


_B, _D = "blocks.{i}", "blocks.{i}"
WAN_NAME_TABLE: list[Rule] = [
    *_linear("patch_embedding", "patch_embedding", "patch_embedding", None),
    *_linear("time_embedder.linear_1", "condition_embedder.time_embedder.linear_1", "time_embedding.0", None),
    *_linear("time_embedder.linear_2", "condition_embedder.time_embedder.linear_2", "time_embedding.2", None),
    *_linear("time_projection", "condition_embedder.time_proj", "time_projection.1", None),
    *_linear("text_embedder.linear_1", "condition_embedder.text_embedder.linear_1", "text_embedding.0", None),
    *_linear("text_embedder.linear_2", "condition_embedder.text_embedder.linear_2", "text_embedding.2", None),
    *_norm("image_embedder.norm1", "condition_embedder.image_embedder.norm1", "img_emb.proj.0", bias=True),
    *_linear("image_embedder.linear_1", "condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1", None),
    *_linear("image_embedder.linear_2", "condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3", None),
    *_norm("image_embedder.norm2", "condition_embedder.image_embedder.norm2", "img_emb.proj.4", bias=True),
    Rule("image_embedder.pos_embed", ("condition_embedder.image_embedder.pos_embed",), ("img_emb.emb_pos",), None),
    # DiT layers
    *_linear(f"{_B}.self_attention.linear_qkv", [f"{_D}.attn1.to_q", f"{_D}.attn1.to_k", f"{_D}.attn1.to_v"],
             [f"{_B}.self_attn.q", f"{_B}.self_attn.k", f"{_B}.self_attn.v"], "column"),
    *_norm(f"{_B}.self_attention.q_norm", f"{_D}.attn1.norm_q", f"{_B}.self_attn.norm_q", "column"),
    *_norm(f"{_B}.self_attention.k_norm", f"{_D}.attn1.norm_k", f"{_B}.self_attn.norm_k", "column"),
    *_linear(f"{_B}.self_attention.linear_proj", f"{_D}.attn1.to_out.0", f"{_B}.self_attn.o", "row"),
    # the cross-attention norm is diffusers' norm2 and the original release's norm3
    *_norm(f"{_B}.cross_attn_norm", f"{_D}.norm2", f"{_B}.norm3", bias=True),
    *_linear(f"{_B}.cross_attention.linear_q", f"{_D}.attn2.to_q", f"{_B}.cross_attn.q", "column"),
    *_linear(f"{_B}.cross_attention.linear_kv", [f"{_D}.attn2.to_k", f"{_D}.attn2.to_v"],
             [f"{_B}.cross_attn.k", f"{_B}.cross_attn.v"], "column"),
    *_linear(f"{_B}.cross_attention.linear_kv_img", [f"{_D}.attn2.add_k_proj", f"{_D}.attn2.add_v_proj"],
             [f"{_B}.cross_attn.k_img", f"{_B}.cross_attn.v_img"], "column"),
    *_norm(f"{_B}.cross_attention.q_norm", f"{_D}.attn2.norm_q", f"{_B}.cross_attn.norm_q", "column"),
    *_norm(f"{_B}.cross_attention.k_norm", f"{_D}.attn2.norm_k", f"{_B}.cross_attn.norm_k", "column"),
    *_norm(f"{_B}.cross_attention.k_img_norm", f"{_D}.attn2.norm_added_k", f"{_B}.cross_attn.norm_k_img", "column"),
    *_linear(f"{_B}.cross_attention.linear_proj", f"{_D}.attn2.to_out.0", f"{_B}.cross_attn.o", "row"),
    *_linear(f"{_B}.mlp.linear_fc1", f"{_D}.ffn.net.0.proj", f"{_B}.ffn.0", "column"),
    *_linear(f"{_B}.mlp.linear_fc2", f"{_D}.ffn.net.2", f"{_B}.ffn.2", "row"),
    Rule(f"{_B}.modulation", (f"{_D}.scale_shift_table",), (f"{_B}.modulation",), None),
    # head
    *_linear("head.proj", "proj_out", "head.head", None),
    Rule("head.modulation", ("scale_shift_table",), ("head.modulation",), None),
]

# keys a source may carry that have no counterpart (diffusers ignores them on load too)
IGNORED_SOURCE_KEYS = {"diffusers": (re.compile(r".*\.norm_added_q\.weight$"),), "original": ()}


class WeightMappingError(KeyError):
    """Source weights do not match the model: missing, unexpected or misshapen keys, all listed."""

    def __str__(self) -> str:
        return self.args[0]


def is_weight_key(key: str) -> bool:
    """State-dict entries that are tensors of the model (megatron layers add ``_extra_state``)."""
    return not key.endswith("._extra_state")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_RULE_PATTERNS = [(_pattern(rule.mm), rule) for rule in WAN_NAME_TABLE]


def rule_for(mm_key: str) -> tuple[Rule, dict[str, str]]:
    """The table row of an mm key and its placeholder values."""
    for pattern, rule in _RULE_PATTERNS:
        match = pattern.match(mm_key)
        if match:
            return rule, match.groupdict()
    raise WeightMappingError(f"mm key {mm_key!r} has no row in the Wan name table")


def detect_format(keys) -> str:
    """'diffusers' or 'original' from the key names of a Wan checkpoint."""
    keys = list(keys)
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith("time_embedding.") or ".self_attn." in k for k in keys):
        return "original"
    raise WeightMappingError("cannot tell the checkpoint format: neither diffusers (condition_embedder.*, "
                             "blocks.N.attn1.*) nor original Wan (time_embedding.*, blocks.N.self_attn.*) keys")


def tp_shard(tensor: torch.Tensor, split: str | None, tp_size: int, tp_rank: int, key: str) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of a full tensor under the table's ``split`` (a view)."""
    if split is None or tp_size == 1:
        return tensor
    dim = 0 if split == "column" else 1
    if tensor.shape[dim] % tp_size:
        raise WeightMappingError(f"{key}: dim {dim} of shape {tuple(tensor.shape)} is not divisible by TP {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def hf_to_mm(source: dict[str, torch.Tensor], mm_keys, tp_size: int = 1, tp_rank: int = 0,
             fmt: str | None = None, check_unexpected: bool = True) -> dict[str, torch.Tensor]:
    """The mm tensors named ``mm_keys`` for TP rank ``tp_rank`` of ``tp_size``, from a full source
    state dict. Raises WeightMappingError listing every missing and (``check_unexpected``: a
    pipeline stage uses only part of the source) unexpected source key."""
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; valid: {FORMATS}")
    out, used, missing = {}, set(), []
    for key in mm_keys:
        rule, values = rule_for(key)
        names = [s.format(**values) for s in rule.sources(fmt)]
        used.update(names)
        absent = [n for n in names if n not in source]
        if absent:
            missing.extend(absent)
            continue
        parts = [tp_shard(source[n], rule.split, tp_size, tp_rank, n) for n in names]
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    ignored = IGNORED_SOURCE_KEYS[fmt]
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


def mm_to_hf(shards: list[dict[str, torch.Tensor]], fmt: str = "diffusers") -> dict[str, torch.Tensor]:
    """Merge the state dicts of all TP ranks (in rank order) back into full source-format tensors."""
    out = {}
    tp = len(shards)
    for key in filter(is_weight_key, shards[0]):
        rule, values = rule_for(key)
        names = [s.format(**values) for s in rule.sources(fmt)]
        pieces = [shard[key].chunk(len(names), dim=0) if len(names) > 1 else (shard[key],) for shard in shards]
        for j, name in enumerate(names):
            per_rank = [p[j] for p in pieces]
            if rule.split is None or tp == 1:
                out[name] = per_rank[0]
            else:
                out[name] = torch.cat(per_rank, dim=0 if rule.split == "column" else 1)
    return out


def global_name(local_name: str, layer_offset: int) -> str:
    """``blocks.{i}.rest`` of a pipeline stage whose first layer is ``layer_offset`` ->
    ``blocks.{layer_offset + i}.rest``; other names unchanged."""
    if not local_name.startswith("blocks."):
        return local_name
    index, rest = local_name[len("blocks."):].split(".", 1)
    return f"blocks.{int(index) + layer_offset}.{rest}"


def load_hf_weights(model: torch.nn.Module, source: dict[str, torch.Tensor], tp_size: int = 1, tp_rank: int = 0,
                    fmt: str | None = None) -> None:
    """Load full diffusers/original weights into this rank's (TP-sharded) model, or into one
    pipeline stage of it (``model.layer_offset``; ``pre_process``/``post_process``); never guesses:
    missing/unexpected keys and shape mismatches are all listed in one error."""
    offset = getattr(model, "layer_offset", 0)
    whole = getattr(model, "pre_process", True) and getattr(model, "post_process", True) and \
        len(getattr(model, "blocks", ())) == getattr(getattr(model, "wan", None), "num_layers", None)
    own = {global_name(k, offset): v for k, v in model.state_dict().items()}
    keys = [k for k in own if is_weight_key(k)]
    mapped = hf_to_mm(source, keys, tp_size, tp_rank, fmt, check_unexpected=whole)
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
    file, or a flat ``{name: tensor}`` state dict saved by ``torch.save`` (``.pth`` / ``.pt``, as
    Phantom-Wan-1.3B.pth); read without running pickled code."""
    from pathlib import Path

    from safetensors.torch import load_file

    source = Path(path)
    if source.is_file() and source.suffix in (".pth", ".pt"):
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{key} = {path!r}: not a flat state dict of tensors ({{name: tensor}})")
        return dict(state)
    files = [source] if source.is_file() and source.suffix == ".safetensors" else sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{key} = {path!r}: no *.safetensors files there; valid: a directory of "
                                "*.safetensors files, a .safetensors file or a .pth/.pt state dict")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
