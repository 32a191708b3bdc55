"""Wan's original VAE release files under mm's (diffusers' ``AutoencoderKLWan``) names.

``Wan2.1_VAE.pth`` (Wan2.1's ``wan/modules/vae.py``, ``WanVAE_``; Wan2.2's A14B models use the same file) and
``Wan2.2_VAE.pth`` (Wan2.2's ``wan/modules/vae2_2.py``, the TI2V-5B VAE) are each a plain ``torch.save`` of
``WanVAE_``'s state dict: Wan's ``_video_vae`` loads them with ``model.load_state_dict(torch.load(path),
assign=True)``. The files hold no config: every structural value is read from the tensors' names and shapes
(``config_from_original``). The latent statistics, which Wan's wrappers (``WanVAE``, ``Wan2_2_VAE``) hard-code,
come from the model JSON's ``ae`` keys, else from those wrappers for 16 (Wan2.1) and 48 (Wan2.2) channels.

The name table (Wan -> mm), R = ``num_res_blocks``; inside a residual block Wan's ``residual.0``, ``residual.2``,
``residual.3``, ``residual.6`` and ``shortcut`` are ``norm1``, ``conv1``, ``norm2``, ``conv2`` and
``conv_shortcut``; attention (``norm``, ``to_qkv``, ``proj``) and resampling (``resample.1``, ``time_conv``)
names are the same on both sides:

    conv1, conv2                                  quant_conv, post_quant_conv
    {encoder,decoder}.conv1                       {encoder,decoder}.conv_in
    {encoder,decoder}.middle.{0,1,2}              {encoder,decoder}.mid_block.{resnets.0,attentions.0,resnets.1}
    {encoder,decoder}.head.{0,2}                  {encoder,decoder}.{norm_out,conv_out}
  Wan2.1, one flat list of blocks per side:
    encoder.downsamples.{n}                       encoder.down_blocks.{n}
    decoder.upsamples.{l * (R + 2) + j}           decoder.up_blocks.{l}.resnets.{j}          (j <= R)
    decoder.upsamples.{l * (R + 2) + R + 1}       decoder.up_blocks.{l}.upsamplers.0
  Wan2.2, one block per level (``is_residual``):
    encoder.downsamples.{l}.downsamples.{j}       encoder.down_blocks.{l}.resnets.{j}        (j < R)
    encoder.downsamples.{l}.downsamples.{R}       encoder.down_blocks.{l}.downsampler
    decoder.upsamples.{l}.upsamples.{j}           decoder.up_blocks.{l}.resnets.{j}          (j <= R)
    decoder.upsamples.{l}.upsamples.{R + 1}       decoder.up_blocks.{l}.upsampler
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from mm.models.release_file import read_state_dict
from mm.models.ae.wan_vae import (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD,
                                  WanVAE, WanVAEConfig)

ORIGINAL_SUFFIXES = (".pth", ".pt")
# the latent statistics of Wan's wrappers, by latent channels
RELEASE_LATENTS = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}
# WanVAEConfig keys that the tensors determine
STRUCTURAL_KEYS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                   "temperal_downsample", "is_residual", "in_channels", "out_channels", "patch_size",
                   "scale_factor_temporal", "scale_factor_spatial")

_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
_MID = {"resnets.0": "middle.0", "attentions.0": "middle.1", "resnets.1": "middle.2"}
_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}


def is_original_vae(path) -> bool:
    """Whether ``ae.from_pretrained`` names a release file (``.pth`` / ``.pt``) rather than a diffusers directory."""
    return bool(path) and Path(path).suffix in ORIGINAL_SUFFIXES and not Path(path).is_dir()


def read_original_vae(path, option: str = "ae.from_pretrained") -> dict[str, torch.Tensor]:
    """The state dict in a release file, memory-mapped (nothing is read until used) and unpickled without running
    code (``mm.models.release_file``); ``option`` names the setting that gave ``path`` in errors."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} = {str(path)!r}: no such file (expected Wan's VAE release file, "
                                "e.g. Wan2.1_VAE.pth)")
    return read_state_dict(path, option, "Wan's VAE release file")


def _indices(state: dict, prefix: str) -> list[int]:
    """The numbers n of the names ``prefix + "n." ...`` in ``state``, in order."""
    found = {name[len(prefix):].split(".", 1)[0] for name in state if name.startswith(prefix)}
    return sorted(int(n) for n in found if n.isdigit())


def _structure(state: dict) -> dict:
    """The structural WanVAEConfig values of a release state dict, read from its names and shapes."""
    def tensor(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"not a Wan VAE state dict: no {name!r} (its names begin {sorted(state)[:5]})")
        return state[name]

    z_dim = tensor("conv2.weight").shape[0]
    base_dim, in_channels = tensor("encoder.conv1.weight").shape[:2]
    out_channels, last_width = tensor("decoder.head.2.weight").shape[:2]
    residual = any(name.startswith("encoder.downsamples.0.downsamples.") for name in state)
    levels: list[dict] = []  # the encoder's levels: width, residual blocks, attention, downsampling
    if residual:
        for level in _indices(state, "encoder.downsamples."):
            prefix = f"encoder.downsamples.{level}.downsamples."
            blocks = [f"{prefix}{j}." for j in _indices(state, prefix)]
            resnets = [b for b in blocks if f"{b}residual.2.weight" in state]
            samplers = [b for b in blocks if f"{b}resample.1.weight" in state]
            if not resnets:
                raise ValueError(f"not a Wan VAE state dict: no residual block under {prefix}*")
            levels.append(dict(width=tensor(f"{resnets[0]}residual.2.weight").shape[0], resnets=len(resnets),
                               attention=False, down=bool(samplers),
                               temporal=any(f"{b}time_conv.weight" in state for b in samplers)))
    else:
        current = None
        for n in _indices(state, "encoder.downsamples."):
            block = f"encoder.downsamples.{n}."
            if f"{block}residual.2.weight" in state:
                if current is None:
                    current = dict(width=state[f"{block}residual.2.weight"].shape[0], resnets=0, attention=False,
                                   down=False, temporal=False)
                    levels.append(current)
                current["resnets"] += 1
            elif f"{block}to_qkv.weight" in state and current is not None:
                current["attention"] = True
            elif f"{block}resample.1.weight" in state and current is not None:
                current.update(down=True, temporal=f"{block}time_conv.weight" in state)
                current = None
            else:
                raise ValueError(f"not a Wan VAE state dict: {block}* is neither a residual block, an attention "
                                 "block after one, nor a resampling block")
    if not levels:
        raise ValueError("not a Wan VAE state dict: no encoder.downsamples.*")
    for i, level in enumerate(levels):
        if level["width"] % base_dim:
            raise ValueError(f"not a Wan VAE state dict: encoder level {i} is {level['width']} wide, not a multiple "
                             f"of encoder.conv1's {base_dim}")
    dim_mult = [level["width"] // base_dim for level in levels]
    temporal = [level["temporal"] for level in levels[:-1]]
    patch = math.isqrt(in_channels // 3)
    if patch * patch * 3 != in_channels:
        raise ValueError(f"not a Wan VAE state dict: encoder.conv1 takes {in_channels} channels; valid: 3 or "
                         "3 x p x p (a p x p patchified video)")
    decoder_base_dim = last_width // dim_mult[0]
    return dict(base_dim=base_dim, decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim,
                z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=levels[0]["resnets"],
                attn_scales=[1.0 / 2**i for i, level in enumerate(levels) if level["attention"]],
                temperal_downsample=temporal, is_residual=residual, in_channels=in_channels,
                out_channels=out_channels, patch_size=patch if patch > 1 else None,
                scale_factor_temporal=2 ** sum(temporal), scale_factor_spatial=2 ** (len(levels) - 1) * patch)


def config_from_original(state: dict, params: dict | None = None, prefix: str = "ae.") -> WanVAEConfig:
    """The WanVAEConfig of a release state dict. Structure from the tensors; ``params`` (the model JSON's ``ae``
    keys) may repeat a structural key only with the same value, and give ``latents_mean`` / ``latents_std``
    (default: Wan's wrappers' for z_dim 16 and 48), ``dropout`` and mm's tiling keys. ``prefix`` names the
    keys in errors."""
    values = _structure(state)
    params = {k: v for k, v in (params or {}).items() if not k.startswith("_")}
    valid = {f.name for f in dataclasses.fields(WanVAEConfig)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"{[prefix + k for k in unknown]} are not Wan VAE parameters; valid: {sorted(valid)}")
    same = {"decoder_base_dim": lambda v: v or values["base_dim"], "patch_size": lambda v: v or 1,
            "attn_scales": lambda v: [float(s) for s in v]}
    for key in sorted(set(params) & set(values)):
        norm = same.get(key, lambda v: v)
        if norm(params[key]) != norm(values[key]):
            raise ValueError(f"{prefix}{key} = {params[key]!r}, but the weights are those of a VAE with {key} = "
                             f"{values[key]!r} (read from the tensors; leave {prefix}{key} out)")
    z_dim = values["z_dim"]
    for i, key in enumerate(("latents_mean", "latents_std")):
        if key in params:
            values[key] = [float(v) for v in params[key]]
        elif z_dim in RELEASE_LATENTS:
            values[key] = list(RELEASE_LATENTS[z_dim][i])
        else:
            raise ValueError(f"{prefix}latents_mean / {prefix}latents_std are required: the file holds no latent "
                             f"statistics and this VAE has z_dim = {z_dim} latent channels (Wan's are known for 16, "
                             "Wan2.1, and 48, Wan2.2)")
        if len(values[key]) != z_dim:
            raise ValueError(f"{prefix}{key} has {len(values[key])} values; the VAE has z_dim = {z_dim} channels")
    values.update({k: v for k, v in params.items() if k not in values})
    return WanVAEConfig(**values)


def original_name(name: str, cfg: WanVAEConfig) -> str:
    """Wan's name of mm's parameter ``name`` in a VAE of ``cfg`` (the table of the module docstring)."""
    parts = name.split(".")
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    side, part, rest = parts[0], parts[1], parts[2:]
    r = cfg.num_res_blocks

    def block(names: list[str]) -> list[str]:
        return [_RESNET[names[0]], *names[1:]] if names[0] in _RESNET else names

    if part in _ENDS:
        path = [_ENDS[part], *rest]
    elif part == "mid_block":
        path = [_MID[".".join(rest[:2])], *block(rest[2:])]
    elif part == "down_blocks" and cfg.is_residual:
        inner, tail = (rest[2], block(rest[3:])) if rest[1] == "resnets" else (str(r), rest[2:])
        path = ["downsamples", rest[0], "downsamples", inner, *tail]
    elif part == "down_blocks":
        path = ["downsamples", rest[0], *block(rest[1:])]
    elif part == "up_blocks":
        level = int(rest[0])
        if rest[1] == "resnets":
            inner, tail = int(rest[2]), block(rest[3:])
        else:  # the upsampler: "upsampler" (residual) or "upsamplers.0"
            inner, tail = r + 1, rest[2:] if rest[1] == "upsampler" else rest[3:]
        path = (["upsamples", str(level), "upsamples", str(inner)] if cfg.is_residual
                else ["upsamples", str(level * (r + 2) + inner)]) + tail
    else:
        raise KeyError(f"{name!r} is not a Wan VAE parameter name")
    return ".".join([side, *path])


def _shapes(cfg: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        vae = WanVAE(cfg)
    return {name: tuple(t.shape) for name, t in vae.state_dict().items()}


def name_table(cfg: WanVAEConfig) -> dict[str, str]:
    """{mm's name: Wan's name} for every parameter of a VAE of ``cfg``, in the order of Wan's state dict (mm's,
    except that a mid block's attention comes between its two residual blocks)."""
    table = {name: original_name(name, cfg) for name in _shapes(cfg)}
    first: dict[str, int] = {}  # where each side's mid block begins in mm's order
    for i, name in enumerate(table):
        if ".mid_block." in name:
            first.setdefault(name.split(".")[0], i)

    def place(item: tuple[int, str]) -> tuple[int, int, int]:
        i, name = item
        if ".mid_block." not in name:
            return i, 0, i
        return first[name.split(".")[0]], int(table[name].split(".middle.")[1].split(".")[0]), i

    return {name: table[name] for _, name in sorted(enumerate(table), key=place)}


def _describe(cfg: WanVAEConfig) -> str:
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in STRUCTURAL_KEYS if getattr(cfg, k) is not None)


def _check(state: dict, shapes: dict[str, tuple], cfg: WanVAEConfig, what: str) -> None:
    """``state``'s names must be exactly ``shapes``', with those shapes."""
    missing = sorted(shapes.keys() - state.keys())
    unexpected = sorted(state.keys() - shapes.keys())
    misshapen = sorted(f"{k} {tuple(state[k].shape)} (expected {shapes[k]})"
                       for k in shapes.keys() & state.keys() if tuple(state[k].shape) != shapes[k])
    if missing or unexpected or misshapen:
        raise ValueError(f"{what} do not match a Wan VAE of {_describe(cfg)}: missing {missing}, unexpected "
                         f"{unexpected}, wrong shape {misshapen}")


def state_from_original(state: dict, cfg: WanVAEConfig) -> dict[str, torch.Tensor]:
    """A release state dict under mm's names (the same tensors). Missing, unexpected and misshapen weights are one
    error that lists them under Wan's names."""
    table = name_table(cfg)
    shapes = _shapes(cfg)
    _check(state, {table[k]: v for k, v in shapes.items()}, cfg, "the weights (under Wan's names)")
    return {mm: state[wan] for mm, wan in table.items()}


def state_to_original(state: dict, cfg: WanVAEConfig) -> dict[str, torch.Tensor]:
    """An mm VAE's state dict under Wan's names, laid out as the release files are (``torch.save`` it). Missing,
    unexpected and misshapen weights are one error that lists them under mm's names."""
    _check(state, _shapes(cfg), cfg, "the weights (under mm's names)")
    return {wan: state[mm] for mm, wan in name_table(cfg).items()}


def original_config(path, params: dict | None = None, option: str = "ae.from_pretrained",
                    prefix: str = "ae.") -> tuple[dict[str, torch.Tensor], WanVAEConfig]:
    """The (memory-mapped) state dict of release file ``path`` and its config; errors name ``option``
    (the setting that gave the path) and the ``params`` keys under ``prefix``."""
    state = read_original_vae(path, option)
    try:
        return state, config_from_original(state, params, prefix=prefix)
    except ValueError as e:
        raise ValueError(f"{option} = {str(path)!r}: {e}") from None


def load_original_vae(path, dtype: torch.dtype | None = torch.float32, params: dict | None = None,
                      option: str = "ae.from_pretrained", prefix: str = "ae.") -> WanVAE:
    """mm's WanVAE with the weights of Wan's release file ``path`` (``dtype`` None: the file's)."""
    state, cfg = original_config(path, params, option, prefix)
    try:
        weights = state_from_original(state, cfg)
    except ValueError as e:
        raise ValueError(f"{option} = {str(path)!r}: {e}") from None
    with torch.device("meta"):  # shapes only; the weights then take the file's tensors
        vae = WanVAE(cfg)
    vae.load_state_dict(weights, strict=True, assign=True)
    return (vae if dtype is None else vae.to(dtype)).eval().requires_grad_(False)
