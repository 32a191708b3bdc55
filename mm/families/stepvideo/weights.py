"""Step-Video-T2V DiT weight names: one declarative table between mm's keys and the release's
(``stepfun-ai/stepvideo-t2v`` ``transformer/diffusion_pytorch_model-*.safetensors``, the reference
``StepVideoModel`` state dict), plus the tensor-parallel split of each tensor.

mm's keys are MindSpeed-MM's names for this DiT (``attn1.proj_qkv``, ``attn1.proj_out``,
``attn2.proj_q``, ``attn2.proj_kv``, ``attn2.proj_out``; the rest as the release) with the layers
under ``blocks.N`` (the DiT shell's). The tensors keep the release's layout: ``proj_qkv`` is
``[heads * 3 * head_dim, hidden]`` with each head's q, k, v rows together, ``proj_kv``
``[heads * 2 * head_dim, hidden]`` with each head's k, v rows together, so a column (dim 0) split
gives each TP rank whole heads. (MindSpeed-MM's own converter reorders these two into
``[all q; all k; all v]``; its converted checkpoints are not this layout.)

Each row: mm key, release key, and how TP splits it ("column": dim 0 per rank, "row": dim 1 per
rank, None: replicated). ``{i}`` stands for a layer number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mm.models.predictor.lora import LoraTargets
from mm.models.predictor.name_table import NameTable, ReleaseConfigError, ShapeOf, WeightMappingError

FORMATS = ("release",)


@dataclass(frozen=True)
class Rule:
    mm: str
    release: str
    split: str | None  # "column", "row" or None

    def sources(self, fmt: str) -> tuple[str, ...]:
        return (self.release,)

    @property
    def fused_parts(self) -> int:
        """How many release tensors this mm tensor fuses: always 1 (the release fuses q/k/v itself)."""
        return 1


def _params(mm: str, release: str, split: str | None = None, bias: bool = True) -> list[Rule]:
    """Rows of one layer's weight (and bias). A row-parallel layer has no bias here."""
    return [Rule(f"{mm}.{p}", f"{release}.{p}", split) for p in (("weight", "bias") if bias else ("weight",))]


_B, _R = "blocks.{i}", "transformer_blocks.{i}"
STEPVIDEO_NAME_TABLE: list[Rule] = [
    *_params("pos_embed.proj", "pos_embed.proj"),
    *_params("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
    *_params("adaln_single.emb.timestep_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
    *_params("adaln_single.linear", "adaln_single.linear"),
    *_params("caption_projection.linear_1", "caption_projection.linear_1"),
    *_params("caption_projection.linear_2", "caption_projection.linear_2"),
    *_params("clip_projection", "clip_projection"),
    # DiT layers
    *_params(f"{_B}.norm1", f"{_R}.norm1"),
    *_params(f"{_B}.attn1.proj_qkv", f"{_R}.attn1.wqkv", "column", bias=False),
    *_params(f"{_B}.attn1.q_norm", f"{_R}.attn1.q_norm", bias=False),
    *_params(f"{_B}.attn1.k_norm", f"{_R}.attn1.k_norm", bias=False),
    *_params(f"{_B}.attn1.proj_out", f"{_R}.attn1.wo", "row", bias=False),
    *_params(f"{_B}.attn2.proj_q", f"{_R}.attn2.wq", "column", bias=False),
    *_params(f"{_B}.attn2.proj_kv", f"{_R}.attn2.wkv", "column", bias=False),
    *_params(f"{_B}.attn2.q_norm", f"{_R}.attn2.q_norm", bias=False),
    *_params(f"{_B}.attn2.k_norm", f"{_R}.attn2.k_norm", bias=False),
    *_params(f"{_B}.attn2.proj_out", f"{_R}.attn2.wo", "row", bias=False),
    *_params(f"{_B}.norm2", f"{_R}.norm2"),
    *_params(f"{_B}.ff.net.0.proj", f"{_R}.ff.net.0.proj", "column", bias=False),
    *_params(f"{_B}.ff.net.2", f"{_R}.ff.net.2", "row", bias=False),
    Rule(f"{_B}.scale_shift_table", f"{_R}.scale_shift_table", None),
    # head
    Rule("scale_shift_table", "scale_shift_table", None),
    *_params("proj_out", "proj_out"),
]


def detect_format(keys) -> str:
    """'release' for the release's key names (``transformer_blocks.N.attn1.wqkv.weight`` ...)."""
    keys = list(keys)
    if any(k.startswith("transformer_blocks.") and ".attn1.wqkv." in k for k in keys):
        return "release"
    hint = (" (MindSpeed-MM's converted names, attn1.proj_qkv: its q/k/v rows are reordered; convert the release "
            "weights instead)" if any(".attn1.proj_qkv." in k for k in keys) else "")
    raise WeightMappingError("cannot tell the checkpoint format: no Step-Video-T2V release keys "
                             f"(transformer_blocks.N.attn1.wqkv.weight){hint}")


# the release config.json (diffusers' ConfigMixin of the reference StepVideoModel) <-> mm's keys
_RELEASE_TO_MM = {"num_layers": "num_layers", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
                  "in_channels": "in_channels", "out_channels": "out_channels", "patch_size": "patch_size",
                  "norm_type": "norm_type", "norm_elementwise_affine": "norm_elementwise_affine",
                  "norm_eps": "norm_eps", "use_additional_conditions": "use_additional_conditions",
                  "caption_channels": "caption_channels", "dropout": "dropout"}
# StepVideoModel's defaults (a key the config.json leaves out takes these)
_RELEASE_DEFAULTS = {"num_attention_heads": 48, "attention_head_dim": 128, "in_channels": 64, "out_channels": 64,
                     "num_layers": 48, "dropout": 0.0, "patch_size": 1, "norm_type": "ada_norm_single",
                     "norm_elementwise_affine": False, "norm_eps": 1e-6, "use_additional_conditions": False,
                     "caption_channels": [6144, 1024]}


def read_stepvideo_arch(config: dict, fmt: str, shape: ShapeOf, where: str) -> dict[str, Any]:
    """The predictor keys of a release config.json, checked against the weights beside it."""
    values = dict(_RELEASE_DEFAULTS, **{k: v for k, v in config.items() if k in _RELEASE_DEFAULTS})
    arch = {mm: values[release] for release, mm in _RELEASE_TO_MM.items()}
    if arch["out_channels"] is None:
        arch["out_channels"] = arch["in_channels"]
    head_dim = arch["head_dim"]
    if head_dim != 128:  # the reference's RoPE split is fixed at [64, 32, 32]
        raise ReleaseConfigError(f"{where}: attention_head_dim = {head_dim}; the Step-Video reference needs 128")
    wqkv = shape("transformer_blocks.0.attn1.wqkv.weight")
    hidden = arch["num_heads"] * head_dim
    if wqkv is not None and wqkv != [3 * hidden, hidden]:
        raise ReleaseConfigError(f"{where}: num_attention_heads x attention_head_dim = {hidden}, but the weights "
                                 f"beside it have transformer_blocks.0.attn1.wqkv.weight of shape {wqkv}")
    return arch


def stepvideo_release_config(arch: dict[str, Any]) -> dict[str, Any]:
    """The release config.json for mm's predictor keys."""
    config = {"_class_name": "StepVideoModel"}
    for release, mm in _RELEASE_TO_MM.items():
        config[release] = arch.get(mm, _RELEASE_DEFAULTS[release])
    thw = arch.get("patch_size_thw")
    if thw is not None:
        config["patch_size"] = thw[1]
    config["attention_type"] = "parallel"
    return config


def stepvideo_expected_keys(arch: dict[str, Any]) -> list[str]:
    """Every mm key of the whole DiT ``arch`` describes (without building it)."""
    from mm.families.stepvideo.config import StepVideoDiTConfig

    config = StepVideoDiTConfig.from_json(arch)
    keys = []
    for rule in STEPVIDEO_NAME_TABLE:
        if rule.mm.startswith("clip_projection.") and config.clip_channels is None:
            continue
        layers = range(config.num_layers) if "{i}" in rule.mm else [None]
        keys.extend(rule.mm.format(i=i) if i is not None else rule.mm for i in layers)
    return keys


STEPVIDEO_WEIGHTS = NameTable("Step-Video-T2V DiT", STEPVIDEO_NAME_TABLE, FORMATS, detect_format,
                              head_prefixes=("scale_shift_table", "proj_out."), read_arch=read_stepvideo_arch,
                              hf_config=stepvideo_release_config, expected_keys=stepvideo_expected_keys)
rule_for, hf_to_mm, mm_to_hf = STEPVIDEO_WEIGHTS.rule_for, STEPVIDEO_WEIGHTS.hf_to_mm, STEPVIDEO_WEIGHTS.mm_to_hf

# what LoRA adapts in a layer (the release fuses q/k/v in one linear, wqkv: one adapter for the three)
STEPVIDEO_LORA = LoraTargets(linears=("attn1.proj_qkv", "attn1.proj_out", "attn2.proj_q", "attn2.proj_kv",
                                      "ff.net.0.proj", "ff.net.2"), table=STEPVIDEO_WEIGHTS)


def load_weights(chunk: torch.nn.Module, source: dict[str, torch.Tensor], tp_size: int = 1, tp_rank: int = 0) -> None:
    """Load the release ``transformer/`` weights (full tensors, release names) into one model chunk
    (a pipeline stage: ``chunk.layer_offset``, embedders on the first, head on the last), this TP
    rank's slices; missing/unexpected keys and shape mismatches fail in one error."""
    whole = chunk.pre_process and chunk.post_process and len(chunk.blocks) == chunk.arch.num_layers
    STEPVIDEO_WEIGHTS.load(chunk, source, tp_size, tp_rank, None, whole)
