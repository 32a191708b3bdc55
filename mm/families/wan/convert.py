"""WanConverter: Wan2.1 / Wan2.2 DiT weights between HuggingFace layouts and mm checkpoints, and Wan's original
VAE release files to diffusers' layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from checkpoint.config import ConvertConfig, ConvertError, SourceDataError
from checkpoint.converter import DiTConverter
from checkpoint.writers import default_mode, staged_target
from mm.models.predictor.wan.weights import WAN_WEIGHTS


class WanConverter(DiTConverter):
    """Wan2.1 / Wan2.2 DiT weights, and the VAE.

    Every variant (Wan2.1 T2V/I2V/FLF2V, Wan2.2 T2V/I2V-A14B experts, TI2V-5B) is read from the
    source: config.json and the tensors present. hf_to_mm reads a diffusers WanTransformer3DModel
    directory or the original Wan release; mm_to_hf writes what WanTransformer3DModel.from_pretrained
    loads. vae_convert turns Wan's VAE release file (Wan2.1_VAE.pth, Wan2.2_VAE.pth) into a
    diffusers AutoencoderKLWan directory.

    Args:
        version: wan2.1 or wan2.2.
    """

    WEIGHTS = WAN_WEIGHTS
    VERSIONS = ("wan2.1", "wan2.2")

    def vae_convert(self, cfg: ConvertConfig, latents_mean: Optional[list[float]] = None,
                    latents_std: Optional[list[float]] = None) -> None:
        """Wan's original VAE release file -> a diffusers AutoencoderKLWan directory for ae.from_pretrained.

        The source is Wan2.1_VAE.pth (Wan2.1; Wan2.2's A14B models use it too) or TI2V-5B's Wan2.2_VAE.pth;
        the target holds config.json and diffusion_pytorch_model.safetensors under AutoencoderKLWan's names.
        The structure is read from the tensors and their dtype is kept; the latent statistics are those of
        Wan's wrappers (16 or 48 channels) unless given.

        Args:
            cfg: source_path (the .pth file), target_path (the directory to write), overwrite.
            latents_mean: the latents' per-channel means (required for a z_dim other than 16 and 48).
            latents_std: their per-channel standard deviations (likewise).
        """
        import torch

        from mm.models.ae.wan_vae import WanVAE, save_wan_vae
        from mm.models.ae.wan_vae_original import (UnreadableVAEFile, config_from_original, read_original_vae,
                                                   state_from_original)

        start = time.perf_counter()
        source = Path(cfg.source_path)
        if not source.is_file():
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a file (expected Wan's VAE release "
                               "file, e.g. Wan2.1_VAE.pth)")
        try:
            state = read_original_vae(source, option="--cfg.source_path")
        except UnreadableVAEFile as e:
            raise SourceDataError(str(e)) from None
        except ValueError as e:
            raise ConvertError(str(e)) from None
        given = {"latents_mean": latents_mean, "latents_std": latents_std}
        try:
            vae_cfg = config_from_original(state, {k: v for k, v in given.items() if v is not None}, prefix="--")
            weights = state_from_original(state, vae_cfg)
        except ValueError as e:
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: {e}") from None
        with torch.device("meta"):  # shapes only; the weights then take the file's tensors
            vae = WanVAE(vae_cfg)
        vae.load_state_dict(weights, strict=True, assign=True)
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            save_wan_vae(vae, str(tmp))
            default_mode(tmp / "diffusion_pytorch_model.safetensors")
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        kind = "Wan2.2, residual" if vae_cfg.is_residual else "Wan2.1"
        self._summary("vae_convert", f"{source} ({len(weights)} tensors, {kind}, z_dim {vae_cfg.z_dim})",
                      cfg.target_path, None, nbytes, start)
