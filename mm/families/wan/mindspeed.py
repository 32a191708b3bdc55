"""MindSpeed-MM's layout of a Wan model JSON (``predictor.model_id: "wandit"``, ``diffusion.model_id:
"wan_flow_match_scheduler"``, ``ae.model_id: "wan_video_vae"``, ``text_encoder.hub_backend``), rewritten into
mm's (``wan_dit``, ``flow_matching``, ``wan_vae``) before anything is validated: every key is carried over,
noted (what mm does instead) or refused with what to use. Its inference JSONs (``WanPipeline``: the
top-level keys of ``mm.families.mindspeed``, diffusers' ``UniPCMultistepScheduler`` as the ``diffusion``
section) become mm's ``inference`` section with the ``unipc`` solver."""

from __future__ import annotations

import copy
from typing import Any

from mm.families.mindspeed import in_layout, inference_section
from mm.families.wan.recipe import CLIP_TOKENS

PREDICTOR_ID, DIFFUSION_ID, AE_ID = "wandit", "wan_flow_match_scheduler", "wan_video_vae"
MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v", "wan2.2-t2v", "wan2.2-i2v")
UNIPC_ID = "UniPCMultistepScheduler"
# diffusers' UniPCMultistepScheduler as Wan's pipelines configure it (flow sigmas, shift by flow_shift): mm's unipc
# solver; another value of one of these keys is another sampler. The beta_* keys do not apply with flow sigmas.
UNIPC_SETTINGS = {"num_train_steps": 1000, "num_train_timesteps": 1000, "solver_order": 2, "predict_x0": True,
                  "prediction_type": "flow_prediction", "use_flow_sigmas": True, "final_sigmas_type": "zero",
                  "lower_order_final": True, "solver_type": "bh2", "disable_corrector": [], "thresholding": False,
                  "timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                  "use_exponential_sigmas": False, "use_beta_sigmas": False, "rescale_betas_zero_snr": False,
                  "trained_betas": None, "solver_p": None, "sample_max_value": 1.0, "dynamic_thresholding_ratio": 0.995}
UNIPC_UNUSED = ("beta_start", "beta_end", "beta_schedule")
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
    if model_type == "flf2v" and img_dim is not None:
        # MindSpeed-MM's FLF2V DiT embeds the two images' CLIP tokens with a learned position table
        out.setdefault("pos_embed_seq_len", 2 * CLIP_TOKENS)
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


def _unipc(section: dict, inference: dict, problems: list[str], notes: list[str]) -> dict:
    """An inference JSON's UniPCMultistepScheduler: flow matching with its shift; the sampling settings go
    to the inference section (sample_solver unipc, sample_steps, sample_shift, guidance_scale[_2])."""
    d = dict(section)
    d.pop("model_id")
    settings = {"sample_solver": "unipc"}
    if "num_inference_steps" in d:
        settings["sample_steps"] = d.pop("num_inference_steps")
    shift = d.pop("flow_shift", 1.0)
    settings["sample_shift"] = shift
    guidance = d.pop("guidance_scale", None)
    if isinstance(guidance, list):  # WanPipeline: [high-noise expert's, low-noise expert's]
        if len(guidance) != 2:
            problems.append(f"diffusion.guidance_scale = {guidance!r}; valid: a number, or [high-noise expert's, "
                            "low-noise expert's] with low_noise_predictor")
        else:
            settings["guidance_scale"], settings["guidance_scale_2"] = guidance
    elif guidance is not None:
        settings["guidance_scale"] = guidance
    for key, value in settings.items():
        if key in inference and inference[key] != value:
            problems.append(f"diffusion ({UNIPC_ID}) and inference.{key} both set the sampler; give it once")
        inference[key] = value
    for key in UNIPC_UNUSED:
        d.pop(key, None)
    for key in [k for k in d if k in UNIPC_SETTINGS]:
        value = d.pop(key)
        if value != UNIPC_SETTINGS[key]:
            problems.append(f"diffusion.{key} = {value!r}: mm's unipc solver is Wan's flow UniPC; valid: "
                            f"{UNIPC_SETTINGS[key]!r}")
    for key in d:
        problems.append(f"diffusion.{key}: not a {UNIPC_ID} key mm reads; valid: num_inference_steps, flow_shift, "
                        f"guidance_scale, {', '.join(UNIPC_SETTINGS)}, {', '.join(UNIPC_UNUSED)}")
    return {"model_id": "flow_matching", "shift": shift}


def _pipeline_config(config: dict, section: dict, problems: list[str], notes: list[str]) -> None:
    """WanPipeline's own pipeline_config keys (Wan2.2 TI2V-5B's): mm derives both from the model."""
    for key in ("expand_timesteps", "vae_scale_factor_spatial"):
        if key in config:
            notes.append(f"pipeline_config.{key} = {config.pop(key)!r}: mm reads it from the model (per-token "
                         "timesteps for a TI2V-5B DiT, whose in_dim equals out_dim; the factor from the VAE's "
                         "config.json)")


def _ae(section: dict, problems: list[str], notes: list[str]) -> tuple[dict, dict | None]:
    """(mm's ae section, the image_encoder section its i2v_processor names, or None)."""
    a = dict(section)
    a.pop("model_id")
    out: dict[str, Any] = {"model_id": "wan_vae"}
    for key in ("from_pretrained", "dtype", "vae_cp_size"):
        if key in a:
            out[key] = a.pop(key)
    if a.pop("enable_tiling", False):
        out["use_tiling"] = True
        tiling = a.pop("tiling_param", None) or {"tile_size": [34, 34], "tile_stride": [18, 16]}
        size, stride = tiling.get("tile_size", [34, 34]), tiling.get("tile_stride", [18, 16])
        # their tiles are in latent pixels (x 8); mm's square tiles and strides in pixels
        out["tile_sample_min_size"], out["tile_sample_stride"] = 8 * max(size), 8 * min(stride)
        notes.append(f"ae.tiling_param = {tiling}: mm tiles frames in squares of {out['tile_sample_min_size']} pixels, "
                     f"{out['tile_sample_stride']} apart, blended linearly (the seams differ from MindSpeed-MM's tiles)")
    else:
        a.pop("tiling_param", None)
    if a.pop("norm_latents", True) is not True:
        problems.append("ae.norm_latents = false: the DiT trains on latents normalised with the VAE's per-channel mean "
                        "and std; valid: true")
    mode = a.pop("norm_mode", "channel_specified_shift_scale")
    if mode != "channel_specified_shift_scale":
        problems.append(f"ae.norm_mode = {mode!r}; valid: channel_specified_shift_scale (the VAE's latents_mean / "
                        "latents_std)")
    if a.pop("do_sample", False):
        problems.append("ae.do_sample = true: mm encodes the posterior mean; valid: false")
    image = None
    processor = a.pop("i2v_processor", None)
    if isinstance(processor, dict):
        processor = dict(processor)
        processor.pop("processor_id", None)
        if processor.get("image_encoder"):
            image = {"model_id": "clip", "from_pretrained": processor.pop("image_encoder")}
        if "i2v_vae_encode_tiling" in processor:
            processor.pop("i2v_vae_encode_tiling")
            notes.append("ae.i2v_processor.i2v_vae_encode_tiling: the condition frames are encoded as the video is "
                         "(ae.enable_tiling)")
        for key in processor:
            problems.append(f"ae.i2v_processor.{key}: unknown key; valid: processor_id, image_encoder, "
                            "i2v_vae_encode_tiling")
    out.update(a)  # unknown keys: the Wan VAE names them
    return out, image


def _hub_backend(section: dict, where: str, problems: list[str]) -> dict:
    section = dict(section)
    backend = section.pop("hub_backend", "hf")
    if backend != "hf":
        problems.append(f"{where}.hub_backend = {backend!r}; valid: hf (a transformers directory)")
    return section


def translate(data: dict, problems: list[str], notes: list[str]) -> dict:
    """The model JSON in mm's terms where it is in MindSpeed-MM's Wan layout; as it is otherwise."""
    pred, diff, ae = data.get("predictor"), data.get("diffusion"), data.get("ae")
    ours_pred = isinstance(pred, dict) and pred.get("model_id") == PREDICTOR_ID
    ours_diff = isinstance(diff, dict) and diff.get("model_id") == DIFFUSION_ID
    ours_ae = isinstance(ae, dict) and ae.get("model_id") == AE_ID
    unipc = isinstance(diff, dict) and diff.get("model_id") == UNIPC_ID
    wan = ours_pred or (isinstance(pred, dict) and pred.get("model_id") == "wan_dit")
    layout = wan and in_layout(data)
    if not (ours_pred or ours_diff or ours_ae or unipc or layout):
        return data
    data = copy.deepcopy(data)
    if layout:
        if "seed" not in (data.get("pipeline_config") or {}):
            notes.append("seed: inference.seed (42; prompt i uses seed + i, on every rank alike); MindSpeed-MM draws "
                         "every prompt's noise from one generator seeded with --seed")
        data = inference_section(data, problems, notes, ("WanPipeline",), _pipeline_config)
    if unipc:
        data["diffusion"] = _unipc(diff, data.setdefault("inference", {}), problems, notes)
    if ours_pred:
        data["predictor"] = _predictor(pred, problems, notes)
    if ours_diff:
        data["diffusion"] = _diffusion(diff, problems, notes)
    if ours_ae:
        data["ae"], image = _ae(ae, problems, notes)
        if image is not None:
            if "image_encoder" in data:
                problems.append("ae.i2v_processor.image_encoder and image_encoder both given; give one")
            else:
                data["image_encoder"] = image
    # MindSpeed-MM's text encoder entries name their hub (transformers only here)
    text = data.get("text_encoder")
    if isinstance(text, dict):
        data["text_encoder"] = _hub_backend(text, "text_encoder", problems)
    elif isinstance(text, list):
        data["text_encoder"] = [_hub_backend(t, f"text_encoder[{i}]", problems) if isinstance(t, dict) else t
                                for i, t in enumerate(text)]
    return data


def feature_predictor(data: dict, problems: list[str], notes: list[str]) -> dict:
    """The Wan DiT a MindSpeed-MM feature-extraction model JSON (its VAE and UMT5, no predictor) extracts for:
    the latent channels from the VAE's config.json (Wan2.1's 16, Wan2.2's 48), the condition from ``task``
    (``i2v``: the first frame's latents and mask beside the noise, 2 z + 4 channels; a 48-channel VAE's TI2V
    replaces the first latent frame instead) and the CLIP image encoder where ``image_encoder`` is given;
    the text width from the text encoder's config.json. Its other sizes (the 1.3B DiT's) are not used: no DiT
    runs during extraction."""
    import json
    from pathlib import Path

    ae = data.get("ae") or {}
    z = 16
    config = Path(str(ae.get("from_pretrained", ""))) / "config.json"
    if config.is_file():
        z = int(json.loads(config.read_text()).get("z_dim", 16))
    text = data.get("text_encoder")
    text_dim = 4096
    text_config = Path(str(text.get("from_pretrained", ""))) / "config.json" if isinstance(text, dict) else None
    if text_config is not None and text_config.is_file():
        text_dim = int(json.loads(text_config.read_text()).get("d_model", text_dim))
    task = data.get("task", "t2v")
    i2v = task == "i2v"
    in_dim = z if (not i2v or z == 48) else 2 * z + 4
    predictor = {"model_id": "wan_dit", "num_layers": 30, "num_heads": 12, "hidden_size": 1536, "ffn_dim": 8960,
                 "in_dim": in_dim, "out_dim": z, "text_dim": text_dim}
    if i2v and data.get("image_encoder") is not None:
        predictor["image_dim"] = 1280
    notes.append(f"no predictor: the features are for a Wan DiT of {z} latent channels, {task}"
                 + (" with the CLIP image branch" if "image_dim" in predictor else "")
                 + " (the VAE's and the text encoder's config.json, the model JSON's task)")
    return predictor
