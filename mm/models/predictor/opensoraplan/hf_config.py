"""Open-Sora-Plan v1.3's release config.json (the reference's ``OpenSoraT2V_v1_3`` /
``OpenSoraInpaint_v1_3`` arguments) <-> mm's predictor config (``OpenSoraPlanDiTConfig``'s keys, as
checkpoint headers record them)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mm.models.predictor.name_table import ReleaseConfigError, ShapeOf
from mm.models.predictor.opensoraplan.config import OpenSoraPlanDiTConfig, OpenSoraPlanI2VConfig

# the reference's model classes (config.json ``_class_name``): T2V, and I2V (inpainting)
T2V_CLASS, I2V_CLASS = "OpenSoraT2V_v1_3", "OpenSoraInpaint_v1_3"
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
        raise ReleaseConfigError(f"{where}: an Open-Sora-Plan v1.3 config.json without {', '.join(missing)}")
    switched_on = [k for k in _MUST_BE_OFF if config.get(k)]
    if switched_on:
        raise ReleaseConfigError(f"{where}: {', '.join(f'{k} = true' for k in switched_on)}; the v1.3 DiT has them off")
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
            raise ReleaseConfigError(f"{where}: vae_scale_factor_t = {given}, but {_MASK_PATCH} has {mask_patch[1]} "
                               "input channels")
        params["vae_scale_factor_t"] = given if given is not None else (mask_patch[1] if mask_patch else 4)
    try:
        arch = (OpenSoraPlanI2VConfig if i2v else OpenSoraPlanDiTConfig).from_json(params)
    except ValueError as e:
        raise ReleaseConfigError(f"{where}: {e}") from None
    # the sizes a config.json could get wrong without the name table noticing
    h, p, out = arch.hidden_size, arch.patch_size[1], arch.out_dim
    expected = {"pos_embed.proj.weight": [h, arch.in_channels, p, p],
                "caption_projection.linear_1.weight": [h, arch.caption_channels],
                "proj_out.weight": [out * p * p, h]}
    wrong = [f"{name} is {shape(name)}, expected {size}" for name, size in expected.items()
             if shape(name) is not None and shape(name) != size]
    if wrong:
        raise ReleaseConfigError(f"{where} does not describe the weights beside it: {'; '.join(wrong)}")
    return dataclasses.asdict(arch)


def config_of(arch: dict[str, Any]) -> OpenSoraPlanDiTConfig:
    """The typed config of recorded predictor keys (the I2V one when they have vae_scale_factor_t)."""
    values = dict(arch)
    i2v = values.get("vae_scale_factor_t") is not None
    if not i2v:
        values.pop("vae_scale_factor_t", None)
    return (OpenSoraPlanI2VConfig if i2v else OpenSoraPlanDiTConfig).from_json(values)


def osp_hf_config(arch: dict[str, Any]) -> dict[str, Any]:
    """The reference's config.json (``OpenSoraT2V_v1_3.from_pretrained``) for recorded predictor keys."""
    osp = config_of(arch)
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
