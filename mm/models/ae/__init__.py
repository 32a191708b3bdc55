"""Video autoencoders: the Wan VAE (Wan2.1 and Wan2.2) and WFVAE (OpenSoraPlan 1.3), chosen by the model
JSON's ``ae.model_id``."""

from __future__ import annotations

import torch

from mm.models.ae.wan_vae import WanVAE, WanVAEConfig, load_wan_vae, save_wan_vae
from mm.models.ae.wfvae import WFVAE, WFVAEConfig
from mm.models.ae.wfvae_checkpoint import load_wfvae, save_wfvae, wfvae_state_dict_from_reference

AE_MODEL_IDS = ("wan_vae", "wfvae")


def load_vae(ae, dtype: torch.dtype = torch.float32) -> WanVAE | WFVAE:
    """The VAE of the model JSON's ``ae`` section (an ``AEConfig``): ``model_id`` picks the implementation,
    ``from_pretrained`` the weights; WFVAE also reads its config keys from the section."""
    if ae.model_id not in AE_MODEL_IDS:
        raise ValueError(f"ae.model_id = {ae.model_id!r}; valid: {', '.join(AE_MODEL_IDS)}")
    if not ae.from_pretrained:
        raise ValueError(f"ae.from_pretrained is required for ae.model_id = {ae.model_id!r}")
    if ae.model_id == "wfvae":
        return load_wfvae(ae.from_pretrained, dtype, ae.params)
    return load_wan_vae(ae.from_pretrained, dtype, ae.params)


def vae_factors(ae) -> tuple[int, int]:
    """(spatial, temporal) compression of the ``ae`` section's VAE, known before it is built (Wan2.1:
    8, 4; Wan2.2's: 16, 4, from its config.json or, for Wan's release file, the tensors' shapes; WFVAE: 8, 4)."""
    import json
    from pathlib import Path

    from mm.models.ae.wan_vae_original import is_original_vae, original_config

    if ae.model_id not in AE_MODEL_IDS:
        raise ValueError(f"ae.model_id = {ae.model_id!r}; valid: {', '.join(AE_MODEL_IDS)}")
    if ae.model_id == "wfvae":
        return WFVAEConfig.scale_factor_spatial, WFVAEConfig.scale_factor_temporal
    if is_original_vae(ae.from_pretrained):  # memory-mapped: only the shapes are read
        vae = original_config(ae.from_pretrained, ae.params)[1]
        return vae.scale_factor_spatial, vae.scale_factor_temporal
    path = Path(ae.from_pretrained) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"ae.from_pretrained = {ae.from_pretrained!r}: no config.json there")
    vae = WanVAEConfig.from_json(json.loads(path.read_text()))
    return vae.scale_factor_spatial, vae.scale_factor_temporal


def vae_latent_channels(ae) -> int:
    """The latent channels of the ``ae`` section's VAE, known before it is built (its config.json, or the
    shapes of Wan's release file; WFVAE: its ``latent_dim`` key); FileNotFoundError where the files are absent."""
    import json
    from pathlib import Path

    from mm.models.ae.wan_vae_original import is_original_vae, original_config

    if ae.model_id == "wfvae":
        return WFVAEConfig.from_json(ae.params).latent_dim
    if is_original_vae(ae.from_pretrained):
        return original_config(ae.from_pretrained, ae.params)[1].z_dim
    path = Path(ae.from_pretrained) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"ae.from_pretrained = {ae.from_pretrained!r}: no config.json there")
    return WanVAEConfig.from_json(json.loads(path.read_text())).z_dim


__all__ = ["AE_MODEL_IDS", "WFVAE", "WFVAEConfig", "WanVAE", "WanVAEConfig", "load_vae", "load_wan_vae", "load_wfvae",
           "save_wan_vae", "save_wfvae", "vae_factors", "vae_latent_channels", "wfvae_state_dict_from_reference"]
