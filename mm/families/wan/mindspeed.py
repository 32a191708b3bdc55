"""MindSpeed-MM's layout of a Wan model JSON (``predictor.model_id: "wandit"``, ``diffusion.model_id:
"wan_flow_match_scheduler"``), rewritten into mm's (``wan_dit``, ``flow_matching``) before anything is
validated: every key is carried over, noted (what mm does instead) or refused with what to use."""

from __future__ import annotations

import copy
from typing import Any

PREDICTOR_ID, DIFFUSION_ID = "wandit", "wan_flow_match_scheduler"
MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")
# predictor keys with the same meaning in mm
SAME = ("num_layers", "num_heads", "hidden_size", "ffn_dim", "in_dim", "out_dim", "patch_size", "freq_dim", "text_dim",
        "cross_attn_norm", "eps", "dtype", "from_pretrained", "pipeline_num_layers", "text_len")
# MindSpeed-MM's kernel and memory switches: mm picks its kernels itself (--attention-kernel, fused norms
# where the accelerator has them) and offloads nothing of the attention
SWITCHES = ("attention_async_offload", "use_fused_rmsnorm", "FPDT", "FPDT_chunk_number", "FPDT_with_offload")


def _predictor(section: dict, problems: list[str], notes: list[str]) -> dict:
    p = dict(section)
    out: dict[str, Any] = {"model_id": "wan_dit"}
    p.pop("model_id")
    for key in SAME:
        if key in p:
            out[key] = p.pop(key)
    if "max_seq_len" in p:
        out["rope_max_seq_len"] = p.pop("max_seq_len")
    model_type = p.pop("model_type", "t2v")
    if model_type not in MODEL_TYPES:
        problems.append(f"predictor.model_type = {model_type!r}; valid: {', '.join(MODEL_TYPES)}")
    img_dim = p.pop("img_dim", None)
    if model_type in ("i2v", "flf2v") and img_dim is not None:
        out["image_dim"] = img_dim  # the CLIP branch (Wan2.1 I2V/FLF2V); a t2v JSON's img_dim is unused
    for key in ("pos_embed_seq_len",):
        if key in p:
            out[key] = p.pop(key)
    if "clip_token_len" in p:
        notes.append(f"predictor.clip_token_len = {p.pop('clip_token_len')}: mm's image branch reads the CLIP tokens "
                     "it is given (the image encoder's, or the features')")
    if p.pop("fp32_calculate", None) is not None:
        notes.append("predictor.fp32_calculate: mm computes the image embedding in the DiT's dtype, its norms and "
                     "modulation in fp32")
    if p.pop("qk_norm", True) is not True:
        problems.append("predictor.qk_norm = false: Wan's DiT normalises q and k (RMSNorm); valid: true")
    norm = p.pop("qk_norm_type", "rmsnorm")
    if norm != "rmsnorm":
        problems.append(f"predictor.qk_norm_type = {norm!r}; valid: rmsnorm")
    switches = [key for key in SWITCHES if key in p]
    for key in switches:
        value = p.pop(key)
        if key in ("FPDT", "attention_async_offload") and value:
            problems.append(f"predictor.{key} = true: mm has no {key}; valid: false (long sequences: "
                            "--context-parallel-size; memory: --recompute-granularity)")
    if switches:
        notes.append(f"predictor: {', '.join(switches)} are MindSpeed-MM's kernel switches; mm chooses its kernels "
                     "(--attention-kernel, fused norms where available)")
    out.update(p)  # what is left is not a Wan DiT key: WanDiTConfig names it
    return out


def _diffusion(section: dict, problems: list[str], notes: list[str]) -> dict:
    d = dict(section)
    d.pop("model_id")
    out: dict[str, Any] = {"model_id": "flow_matching", "timestep_grid": d.pop("num_train_timesteps", 1000),
                           "loss_weighting": "bsmntw"}
    out["num_train_timesteps"] = out["timestep_grid"]
    for key in ("shift", "sigma_min", "sigma_max", "extra_one_step"):
        if key in d:
            out[key] = d.pop(key)
    out.setdefault("shift", 3.0)
    out.setdefault("sigma_min", 0.003 / 1.002)
    for key in ("min_timestep_boundary", "max_timestep_boundary"):
        if key in d:
            problems.append(f"diffusion.{key} = {d.pop(key)!r}: give the expert's range with --{key.replace('_', '-')}")
    for key in ("inverse_timesteps", "reverse_sigmas"):
        if d.pop(key, False):
            problems.append(f"diffusion.{key} = true: mm's flow matching runs from noise (t = 1000) to data; valid: "
                            "false")
    for key in ("num_inference_timesteps", "guidance_scale"):
        if key in d:
            d.pop(key)
            notes.append(f"diffusion.{key}: sampling settings are the inference section's (inference.py)")
    notes.append("diffusion.model_id = 'wan_flow_match_scheduler': flow matching on its grid of "
                 f"{out['timestep_grid']} timesteps with its bsmntw loss weights; one timestep per sample (it draws one "
                 "per micro-batch)")
    out.update(d)  # unknown keys: FlowMatchingConfig names them
    return out


def translate(data: dict, problems: list[str], notes: list[str]) -> dict:
    """The model JSON in mm's terms where it is in MindSpeed-MM's Wan layout; as it is otherwise."""
    pred, diff = data.get("predictor"), data.get("diffusion")
    ours_pred = isinstance(pred, dict) and pred.get("model_id") == PREDICTOR_ID
    ours_diff = isinstance(diff, dict) and diff.get("model_id") == DIFFUSION_ID
    if not (ours_pred or ours_diff):
        return data
    data = copy.deepcopy(data)
    if ours_pred:
        data["predictor"] = _predictor(pred, problems, notes)
    if ours_diff:
        data["diffusion"] = _diffusion(diff, problems, notes)
    return data
