"""Open-Sora-Plan v1.3 DiT weight names: one declarative table between mm's keys and the reference
release's (``transformer_blocks.N.attn1.to_q`` ..., the HF ``diffusion_pytorch_model.safetensors``),
plus the tensor-parallel split of each tensor.

Each row: mm key, reference key(s), and how TP splits it ("column": dim 0 per rank, "row": dim 1
per rank, None: replicated). A row with several reference keys fuses them: mm's TP rank r holds the
concatenation of rank r's slice of each (a fused q/k/v shard holds that rank's heads of q, k and v).
``{i}`` stands for a layer number. MindSpeed-MM's converted checkpoints (``mindspeed`` format) use the
reference names with its renaming (``transformer_blocks`` -> ``videodit_sparse_blocks``, ``attn1`` ->
``self_atten``, ``to_q`` -> ``proj_q`` ...), derived here by ``mindspeed_name``. Used by
``load_reference_weights`` and the parity tests now, and by the converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mm.models.predictor.lora import LoraTargets
from mm.models.predictor.name_table import NameTable, WeightMappingError
from mm.models.predictor.opensoraplan.hf_config import config_of, osp_hf_config, read_osp_arch

FORMATS = ("opensoraplan", "mindspeed")

# MindSpeed-MM's OpenSoraPlanConverter v1.3 renaming, applied in this order
_MINDSPEED_RENAMES = (("transformer_blocks", "videodit_sparse_blocks"), ("attn1", "self_atten"),
                      ("attn2", "cross_atten"), ("to_q", "proj_q"), ("to_k", "proj_k"), ("to_v", "proj_v"),
                      ("to_out.0", "proj_out"))


def mindspeed_name(reference: str) -> str:
    for old, new in _MINDSPEED_RENAMES:
        reference = reference.replace(old, new)
    return reference


@dataclass(frozen=True)
class Rule:
    mm: str
    reference: tuple[str, ...]
    split: str | None  # "column", "row" or None

    def sources(self, fmt: str) -> tuple[str, ...]:
        return self.reference if fmt == "opensoraplan" else tuple(mindspeed_name(r) for r in self.reference)

    @property
    def fused_parts(self) -> int:
        """How many reference tensors this mm tensor fuses (self-attention q/k/v: 3)."""
        return len(self.reference)


def _linear(mm: str, reference, split: str | None) -> list[Rule]:
    """Weight and bias rows of one linear/conv layer. A row-parallel bias is replicated."""
    reference = (reference,) if isinstance(reference, str) else tuple(reference)
    return [Rule(f"{mm}.{p}", tuple(f"{r}.{p}" for r in reference),
                 split if (p == "weight" or split == "column") else None) for p in ("weight", "bias")]


_B, _R = "blocks.{i}", "transformer_blocks.{i}"
OSP_NAME_TABLE: list[Rule] = [
    *_linear("patch_embedding.proj", "pos_embed.proj", None),
    *_linear("masked_video_embedding.patch.proj", "pos_embed_masked_hidden_states.0.proj", None),
    Rule("masked_video_embedding.linear.weight", ("pos_embed_masked_hidden_states.1.weight",), None),
    *_linear("mask_embedding.patch.proj", "pos_embed_mask.0.proj", None),
    Rule("mask_embedding.linear.weight", ("pos_embed_mask.1.weight",), None),
    *_linear("time_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1", None),
    *_linear("time_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2", None),
    *_linear("time_projection", "adaln_single.linear", None),
    *_linear("caption_projection.linear_1", "caption_projection.linear_1", None),
    *_linear("caption_projection.linear_2", "caption_projection.linear_2", None),
    # DiT layers (norm1/norm2 have parameters only with predictor.norm_elementwise_affine)
    *_linear(f"{_B}.norm1", f"{_R}.norm1", None),
    *_linear(f"{_B}.self_attention.linear_qkv", [f"{_R}.attn1.to_q", f"{_R}.attn1.to_k", f"{_R}.attn1.to_v"], "column"),
    *_linear(f"{_B}.self_attention.linear_proj", f"{_R}.attn1.to_out.0", "row"),
    *_linear(f"{_B}.cross_attention.linear_q", f"{_R}.attn2.to_q", "column"),
    *_linear(f"{_B}.cross_attention.linear_kv", [f"{_R}.attn2.to_k", f"{_R}.attn2.to_v"], "column"),
    *_linear(f"{_B}.cross_attention.linear_proj", f"{_R}.attn2.to_out.0", "row"),
    *_linear(f"{_B}.norm2", f"{_R}.norm2", None),
    *_linear(f"{_B}.mlp.linear_fc1", f"{_R}.ff.net.0.proj", "column"),
    *_linear(f"{_B}.mlp.linear_fc2", f"{_R}.ff.net.2", "row"),
    Rule(f"{_B}.scale_shift_table", (f"{_R}.scale_shift_table",), None),
    # head
    Rule("scale_shift_table", ("scale_shift_table",), None),
    *_linear("proj_out", "proj_out", None),
]


def detect_format(keys) -> str:
    """'opensoraplan' or 'mindspeed' from the key names of a v1.3 DiT checkpoint."""
    keys = list(keys)
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "opensoraplan"
    if any(k.startswith("videodit_sparse_blocks.") for k in keys):
        return "mindspeed"
    raise WeightMappingError("cannot tell the checkpoint format: neither Open-Sora-Plan (transformer_blocks.N.*) "
                             "nor MindSpeed-MM (videodit_sparse_blocks.N.*) keys")


_I2V_PREFIXES = ("masked_video_embedding.", "mask_embedding.")


def osp_expected_keys(arch: dict[str, Any]) -> list[str]:
    """Every mm key of the whole DiT ``arch`` describes (the model's state dict, without building it)."""
    osp = config_of(arch)
    keys = []
    for rule in OSP_NAME_TABLE:
        template = rule.mm
        if template.startswith(_I2V_PREFIXES) and not osp.is_i2v:
            continue
        if template.startswith(("blocks.{i}.norm1.", "blocks.{i}.norm2.")) and not osp.norm_elementwise_affine:
            continue
        if template.endswith(("linear_qkv.bias", "cross_attention.linear_q.bias",
                              "cross_attention.linear_kv.bias")) and not osp.attention_q_bias:
            continue
        layers = range(osp.num_layers) if "{i}" in template else [None]
        keys.extend(template.format(i=i) if i is not None else template for i in layers)
    return keys


OSP_WEIGHTS = NameTable("Open-Sora-Plan v1.3 DiT", OSP_NAME_TABLE, FORMATS, detect_format,
                        head_prefixes=("scale_shift_table", "proj_out."), read_arch=read_osp_arch,
                        hf_config=osp_hf_config, expected_keys=osp_expected_keys)
rule_for, hf_to_mm, mm_to_hf = OSP_WEIGHTS.rule_for, OSP_WEIGHTS.hf_to_mm, OSP_WEIGHTS.mm_to_hf

# what LoRA adapts in a layer (MindSpeed-MM's names, proj_q ... proj_out, are the table's mindspeed format)
OSP_LORA = LoraTargets(linears=("self_attention.linear_qkv", "self_attention.linear_proj", "cross_attention.linear_q",
                                "cross_attention.linear_kv", "cross_attention.linear_proj", "mlp.linear_fc1",
                                "mlp.linear_fc2"), table=OSP_WEIGHTS)


def load_reference_weights(model: torch.nn.Module, source: dict[str, torch.Tensor], tp_size: int = 1,
                           tp_rank: int = 0, fmt: str | None = None) -> None:
    """Load full reference (or MindSpeed-MM) weights into this rank's model or pipeline stage
    (``model.layer_offset``); missing/unexpected keys and shape mismatches fail in one error."""
    whole = model.pre_process and model.post_process and len(model.blocks) == model.osp.num_layers
    OSP_WEIGHTS.load(model, source, tp_size, tp_rank, fmt, whole)
