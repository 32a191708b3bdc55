"""WFVAE checkpoints: the reference's state dicts and training checkpoints (the released ``merged.ckpt``)
onto ``WFVAE``, and loading from the model JSON's ``ae`` section."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from mm.models.ae.wfvae import WFVAE, WFVAEConfig, haar_filters


def _haar_keys() -> dict[str, torch.Tensor]:
    """The fixed filters the reference stores in its state dict, by name."""
    names3 = ["h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v"]
    f3, f2 = haar_filters(3), haar_filters(2)
    keys = {}
    for prefix in ("encoder.wavelet_transform_in", "encoder.wavelet_transform_l2"):
        keys.update({f"{prefix}.{n}_conv.conv.weight": f3[i].unsqueeze(0) for i, n in enumerate(names3)})
    for prefix in ("decoder.inverse_wavelet_transform_out", "decoder.inverse_wavelet_transform_l2"):
        keys.update({f"{prefix}.{n}": f3[i].unsqueeze(0) for i, n in enumerate(names3)})
    for prefix in ("encoder.wavelet_transform_l1", "decoder.inverse_wavelet_transform_l1"):
        keys.update({f"{prefix}.{n}": f2[i].unsqueeze(0) for i, n in enumerate(["aa", "ad", "da", "dd"])})
    return keys


def wfvae_state_dict_from_reference(checkpoint: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict from the reference's (a ``WFVAEModel.state_dict()`` or a training checkpoint such as
    the released ``merged.ckpt``: ``ema_state_dict`` when present and ``use_ema``, else ``state_dict``
    [``gen_model``], as the reference's ``init_from_ckpt`` picks). Names are the same; the fixed Haar
    filters the reference stores are checked against ours and dropped."""
    state = checkpoint
    if use_ema and checkpoint.get("ema_state_dict"):
        state = {k.removeprefix("module."): v for k, v in checkpoint["ema_state_dict"].items()}
    elif "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
        state = state.get("gen_model", state)
    haar = _haar_keys()
    out = {}
    for name, value in state.items():
        if name in haar:
            if value.shape != haar[name].shape or not torch.allclose(value.float(), haar[name], atol=2e-3):
                raise ValueError(f"WFVAE checkpoint: {name} is not the Haar filter {haar[name].flatten().tolist()}")
            continue
        out[name] = value
    return out


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_wfvae(from_pretrained: str, dtype: torch.dtype = torch.float32, params: dict | None = None) -> WFVAE:
    """A WFVAE from ``ae.from_pretrained``: a directory (the reference's layout: config.json and one
    ``*.ckpt``, or ours: config.json and ``model.safetensors``) or a weights file (``.pt`` / ``.ckpt`` /
    ``.safetensors``, e.g. vae_convert's ``vae.pt``). The config is the directory's config.json, if
    any, updated with the model JSON's ``ae`` keys (``params``). Missing or unexpected weights are an
    error that lists them."""
    path = Path(from_pretrained)
    values: dict = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            values.update(json.loads((path / "config.json").read_text()))
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.ckpt")) or sorted(path.glob("*.pt"))
        if len(files) != 1:
            raise FileNotFoundError(f"ae.from_pretrained = {from_pretrained!r}: expected one *.safetensors, *.ckpt "
                                    f"or *.pt file there, found {[f.name for f in files]}")
        weights = files[0]
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"ae.from_pretrained = {from_pretrained!r}: no such file or directory")
    values.update(params or {})
    vae = WFVAE(WFVAEConfig.from_json(values))
    state = wfvae_state_dict_from_reference(_read_weights(weights))
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"ae.from_pretrained = {from_pretrained!r}: weights do not match the config: "
                       f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return vae.to(dtype).eval().requires_grad_(False)


def save_wfvae(vae: WFVAE, directory: str) -> None:
    """Write ``vae`` as a directory (config.json + model.safetensors) that ``load_wfvae`` reads."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dataclasses.asdict(vae.cfg).items() if k not in ("use_tiling", "t_chunk_enc", "t_chunk_dec")}
    (path / "config.json").write_text(json.dumps(dict(config, _class_name="WFVAEModel"), indent=1))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path / "model.safetensors"))
