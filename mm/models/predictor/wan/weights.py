"""Wan DiT weight names: one declarative table between mm's keys, diffusers' and the original
Wan release's, plus the tensor-parallel split of each tensor.

Each row: mm key, diffusers key(s), original key(s), and how TP splits it ("column": dim 0 per
rank, "row": dim 1 per rank, None: replicated). A row with several source keys fuses them: mm's
TP rank r holds the concatenation of rank r's slice of each (so a fused q/k/v shard holds that
rank's heads of q, k and v). ``{i}`` stands for a layer number. ``WAN_WEIGHTS`` (the table with
its formats and config.json mapping) is used by ``load_hf_weights``, the distributed-checkpoint
sharding and mm-convert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mm.models.predictor.lora import LoraTargets
from mm.models.predictor.name_table import NameTable, WeightMappingError
from mm.models.predictor.wan.hf_config import diffusers_config, read_wan_arch

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


def detect_format(keys) -> str:
    """'diffusers' or 'original' from the key names of a Wan checkpoint."""
    keys = list(keys)
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith("time_embedding.") or ".self_attn." in k for k in keys):
        return "original"
    raise WeightMappingError("cannot tell the checkpoint format: neither diffusers (condition_embedder.*, "
                             "blocks.N.attn1.*) nor original Wan (time_embedding.*, blocks.N.self_attn.*) keys")


WAN_WEIGHTS = NameTable("Wan DiT", WAN_NAME_TABLE, FORMATS, detect_format, IGNORED_SOURCE_KEYS,
                        head_prefixes=("head.",), read_arch=read_wan_arch, hf_config=diffusers_config)
rule_for, hf_to_mm, mm_to_hf = WAN_WEIGHTS.rule_for, WAN_WEIGHTS.hf_to_mm, WAN_WEIGHTS.mm_to_hf

# what LoRA adapts in a Wan layer; MindSpeed-MM's Wan layers name q/k/v/o ``proj_q`` ... ``proj_out`` and keep the
# original release's ``ffn.0`` / ``ffn.2`` (its finetune_lora.sh targets ``ffn.2 ffn.0 proj_q proj_k proj_v proj_out``)
WAN_LORA = LoraTargets(
    linears=("self_attention.linear_qkv", "self_attention.linear_proj", "cross_attention.linear_q",
             "cross_attention.linear_kv", "cross_attention.linear_kv_img", "cross_attention.linear_proj",
             "mlp.linear_fc1", "mlp.linear_fc2"),
    table=WAN_WEIGHTS,
    aliases={f"{attn}.proj_{mine}": f"{attn}.{theirs}" for attn in ("self_attn", "cross_attn")
             for mine, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))},
    alias_naming="MindSpeed-MM")


def load_hf_weights(model: torch.nn.Module, source: dict[str, torch.Tensor], tp_size: int = 1, tp_rank: int = 0,
                    fmt: str | None = None) -> None:
    """Load full diffusers/original weights into this rank's (TP-sharded) model, or into one
    pipeline stage of it (``model.layer_offset``; ``pre_process``/``post_process``); never guesses:
    missing/unexpected keys and shape mismatches are all listed in one error."""
    whole = getattr(model, "pre_process", True) and getattr(model, "post_process", True) and \
        len(getattr(model, "blocks", ())) == getattr(getattr(model, "wan", None), "num_layers", None)
    WAN_WEIGHTS.load(model, source, tp_size, tp_rank, fmt, whole)
