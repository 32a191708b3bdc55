"""OpenSoraPlanConverter: Open-Sora-Plan v1.3 weights (the sparse DiT, ``videoditsparse`` /
``videoditsparsei2v``, and the WFVAE) from the reference release to mm."""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from checkpoint.config import ConvertConfig, ConvertError
from checkpoint.converter import DiTConverter
from checkpoint.families import ModelWeights, ShapeOf
from checkpoint.writers import compact, staged_file
from mm.models.predictor.opensoraplan.config import OpenSoraPlanDiTConfig, OpenSoraPlanI2VConfig
from mm.models.predictor.opensoraplan.weights import OSP_NAME_TABLE, detect_format, rule_for

# the reference's model classes (config.json ``_class_name``): T2V, and I2V (inpainting)
T2V_CLASS, I2V_CLASS = "OpenSoraT2V_v1_3", "OpenSoraInpaint_v1_3"
_I2V_PREFIXES = ("masked_video_embedding.", "mask_embedding.")
_MASK_PATCH = "pos_embed_mask.0.proj.weight"  # [hidden, vae_scale_factor_t, p, p]
# reference options that change the architecture; the v1.3 release leaves them off
_MUST_BE_OFF = ("only_cross_attention", "double_self_attention", "upcast_attention", "use_additional_conditions")


def read_osp_arch(config: dict, fmt: str, shape: ShapeOf, where: str) -> dict[str, Any]:
    """The model JSON's predictor keys (OpenSoraPlanDiTConfig, as pretrain records them) from the
    reference's config.json (``OpenSoraT2V_v1_3`` / ``OpenSoraInpaint_v1_3`` arguments), checked
    against the sizes the weights carry. I2V: the class says so or the mask embedding is there."""
    missing = [k for k in ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels",
                           "caption_channels", "patch_size") if config.get(k) is None]
    if missing:
        raise ConvertError(f"{where}: an Open-Sora-Plan v1.3 config.json without {', '.join(missing)}")
    switched_on = [k for k in _MUST_BE_OFF if config.get(k)]
    if switched_on:
        raise ConvertError(f"{where}: {', '.join(f'{k} = true' for k in switched_on)}; the v1.3 DiT has them off")
    heads, head_dim, patch = config["num_attention_heads"], config["attention_head_dim"], config["patch_size"]
    mask_patch = shape(_MASK_PATCH)
    i2v = config.get("_class_name") == I2V_CLASS or mask_patch is not None
    bias = config.get("attention_bias", True)
    params = dict(num_layers=config["num_layers"], num_heads=heads, head_dim=head_dim,
                  in_channels=config["in_channels"], out_channels=config.get("out_channels"),
                  dropout=config.get("dropout", 0.0), cross_attention_dim=config.get("cross_attention_dim"),
                  attention_q_bias=bias, attention_k_bias=bias, attention_v_bias=bias,
                  patch_size_thw=[config.get("patch_size_t") or 1, patch, patch],
                  activation_fn=config.get("activation_fn", "gelu-approximate"),
                  norm_elementwise_affine=config.get("norm_elementwise_affine", False),
                  norm_eps=config.get("norm_eps", 1e-6), caption_channels=config["caption_channels"],
                  interpolation_scale=[config.get(f"interpolation_scale_{a}", 1.0) for a in "thw"],
                  sparse1d=config.get("sparse1d", False), sparse_n=config.get("sparse_n", 2))
    if i2v:
        given = config.get("vae_scale_factor_t")
        if mask_patch is not None and given is not None and given != mask_patch[1]:
            raise ConvertError(f"{where}: vae_scale_factor_t = {given}, but {_MASK_PATCH} has {mask_patch[1]} "
                               "input channels")
        params["vae_scale_factor_t"] = given if given is not None else (mask_patch[1] if mask_patch else 4)
    try:
        arch = (OpenSoraPlanI2VConfig if i2v else OpenSoraPlanDiTConfig).from_json(params)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None
    # the sizes a config.json could get wrong without the name table noticing
    h, p, out = arch.hidden_size, arch.patch_size[1], arch.out_dim
    expected = {"pos_embed.proj.weight": [h, arch.in_channels, p, p],
                "caption_projection.linear_1.weight": [h, arch.caption_channels],
                "proj_out.weight": [out * p * p, h]}
    wrong = [f"{name} is {shape(name)}, expected {size}" for name, size in expected.items()
             if shape(name) is not None and shape(name) != size]
    if wrong:
        raise ConvertError(f"{where} does not describe the weights beside it: {'; '.join(wrong)}")
    return dataclasses.asdict(arch)


def _config_of(arch: dict[str, Any]) -> OpenSoraPlanDiTConfig:
    values = dict(arch)
    i2v = values.get("vae_scale_factor_t") is not None
    if not i2v:
        values.pop("vae_scale_factor_t", None)
    return (OpenSoraPlanI2VConfig if i2v else OpenSoraPlanDiTConfig).from_json(values)


def osp_hf_config(arch: dict[str, Any]) -> dict[str, Any]:
    """The reference's config.json (``OpenSoraT2V_v1_3.from_pretrained``) for recorded predictor keys."""
    osp = _config_of(arch)
    config = {"_class_name": I2V_CLASS if osp.is_i2v else T2V_CLASS, "num_attention_heads": osp.num_heads,
              "attention_head_dim": osp.head_dim, "in_channels": osp.in_channels, "out_channels": osp.out_dim,
              "num_layers": osp.num_layers, "dropout": osp.dropout, "cross_attention_dim": osp.hidden_size,
              "attention_bias": osp.attention_q_bias, "patch_size_t": osp.patch_size[0],
              "patch_size": osp.patch_size[1], "activation_fn": osp.activation_fn,
              "norm_elementwise_affine": osp.norm_elementwise_affine, "norm_eps": osp.norm_eps,
              "caption_channels": osp.caption_channels, "interpolation_scale_t": osp.interpolation_scale[0],
              "interpolation_scale_h": osp.interpolation_scale[1], "interpolation_scale_w": osp.interpolation_scale[2],
              "sparse1d": osp.sparse1d, "sparse_n": osp.sparse_n}
    if osp.is_i2v:
        config["vae_scale_factor_t"] = osp.vae_scale_factor_t
    return config


def osp_expected_keys(arch: dict[str, Any]) -> list[str]:
    """Every mm key of the whole DiT ``arch`` describes (the model's state dict, without building it)."""
    osp = _config_of(arch)
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


OSP_WEIGHTS = ModelWeights(name="Open-Sora-Plan v1.3 DiT", table=OSP_NAME_TABLE, rule_for=rule_for,
                           detect_format=detect_format, hf_format="opensoraplan",
                           head_prefixes=("scale_shift_table", "proj_out."), read_arch=read_osp_arch,
                           hf_config=osp_hf_config, expected_keys=osp_expected_keys)


def _read_training_checkpoint(path: Path) -> dict:
    """The reference's torch checkpoint, unpickled without running code (tensors and plain containers)."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"--cfg.source_path = {str(path)!r} holds more than tensors and plain containers, and "
                           f"mm-convert does not run pickled code: {str(e).splitlines()[0]}") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ConvertError(f"--cfg.source_path = {str(path)!r} is not a readable torch checkpoint: {e}") from None
    if not isinstance(checkpoint, dict):
        raise ConvertError(f"--cfg.source_path = {str(path)!r} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def _check_vae_state(state: dict, config_file: Path) -> str:
    """Every tensor a WFVAE of ``config_file``'s config has, with its shape, and nothing else; returns a
    phrase for the summary."""
    from mm.models.ae.wfvae import WFVAE, WFVAEConfig

    try:
        cfg = WFVAEConfig.from_json(json.loads(config_file.read_text()))
    except ValueError as e:
        raise ConvertError(f"{config_file} (the VAE config beside --cfg.source_path): {e}") from None
    with torch.device("meta"):
        model = WFVAE(cfg)
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{k}: {list(state[k].shape)}, expected {own[k]}" for k in own
                 if k in state and list(state[k].shape) != own[k]]
    if missing or unexpected or misshapen:
        problems = [f"{what} ({len(keys)}): {', '.join(keys[:20])}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
        raise ConvertError(f"--cfg.source_path: the weights do not match the WFVAE {config_file} describes:\n  "
                           + "\n  ".join(problems))
    return f"checked against {config_file.name}"


class OpenSoraPlanConverter(DiTConverter):
    """Open-Sora-Plan v1.3: the sparse DiT (T2V ``videoditsparse``, I2V ``videoditsparsei2v``) and the WFVAE.

    hf_to_mm reads the release's DiT directory (e.g. 93x480p/: config.json and
    diffusion_pytorch_model*.safetensors, under the reference's names or MindSpeed-MM's); whether
    it is T2V or I2V comes from config.json and the tensors present. mm_to_hf writes that layout
    back (the reference's names). vae_convert turns the released VAE checkpoint into the vae.pt
    that the model JSON's ae.from_pretrained reads.

    Args:
        version: v1.3.
    """

    WEIGHTS = OSP_WEIGHTS
    VERSIONS = ("v1.3",)

    def vae_convert(self, cfg: ConvertConfig, use_ema: bool = True) -> None:
        """The released WFVAE checkpoint (merged.ckpt: a torch file holding the reference's state dict,
        EMA weights, or a training checkpoint) -> vae.pt, a flat {name: tensor} state dict that
        ae.from_pretrained reads (the model JSON's ae keys give the config). The reference's fixed
        Haar filters are checked and left out. When a config.json lies beside the source (the
        release's vae/ directory), every tensor is checked against the WFVAE it describes.

        Args:
            cfg: source_path (the .ckpt file), target_path (the .pt file to write), overwrite.
            use_ema: take ema_state_dict when the checkpoint has one (as the reference does).
        """
        from mm.models.ae.wfvae_checkpoint import wfvae_state_dict_from_reference

        start = time.perf_counter()
        source = Path(cfg.source_path)
        if not source.is_file():
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a file (expected the released VAE "
                               "checkpoint, e.g. vae/merged.ckpt)")
        checkpoint = _read_training_checkpoint(source)
        try:
            state = wfvae_state_dict_from_reference(checkpoint, use_ema=use_ema)
        except ValueError as e:
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: {e}") from None
        not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        if not state or not_tensors:
            found = f"; not tensors: {', '.join(not_tensors[:10])}" if not_tensors else ""
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: no WFVAE state dict there (top-level keys "
                               f"{sorted(checkpoint)[:10]}{found})")
        strangers = sorted(k for k in state if not k.startswith(("encoder.", "decoder.")))
        if strangers:
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a WFVAE state dict (tensors outside "
                               f"encoder.* / decoder.*: {', '.join(strangers[:10])})")
        config_file = source.parent / "config.json"
        checked = _check_vae_state(state, config_file) if config_file.is_file() else "no config.json beside it to check"
        state = {k: compact(v) for k, v in state.items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        with staged_file(cfg.target_path, cfg.overwrite) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
        weights = "EMA" if use_ema and checkpoint.get("ema_state_dict") else "model"
        self._summary("vae_convert", f"{source} ({len(state)} {weights} tensors, {checked})", cfg.target_path, None,
                      nbytes, start)
