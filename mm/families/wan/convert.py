"""WanConverter: Wan2.1 / Wan2.2 DiT weights between HuggingFace layouts and mm checkpoints, and Wan's
VAE, text and image encoder release files to diffusers / transformers directories."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from checkpoint.config import ConvertConfig, ConvertError, SourceDataError
from checkpoint.converter import DiTConverter
from checkpoint.sources import read_torch_state
from checkpoint.writers import default_mode, default_modes, staged_target
from mm.models.predictor.wan.weights import WAN_WEIGHTS

# what t5_convert copies from the tokenizer directory (Wan's google/umt5-xxl holds the first four)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json",
                   "added_tokens.json")


def clip_preprocessor_config(size: int, mean, std) -> dict:
    """A transformers ``CLIPImageProcessor``'s preprocessor_config.json for a tower of ``size`` pixels
    (the values diffusers' Wan I2V ``image_processor`` has: shortest edge ``size``, centre crop,
    bicubic). mm's ``ClipImageEncoder`` reads ``image_mean`` / ``image_std`` and resizes as Wan does."""
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(mean),
            "image_processor_type": "CLIPImageProcessor", "image_std": list(std), "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}


class WanConverter(DiTConverter):
    """Wan2.1 / Wan2.2 DiT weights, Wan's VAE, UMT5 text encoder and Wan2.1's CLIP image encoder.

    Every variant (Wan2.1 T2V/I2V/FLF2V, Wan2.2 T2V/I2V-A14B experts, TI2V-5B) is read from the
    source: config.json and the tensors present. hf_to_mm reads a diffusers WanTransformer3DModel
    directory or the original Wan release; mm_to_hf writes what WanTransformer3DModel.from_pretrained
    loads. vae_convert turns Wan's VAE release file (Wan2.1_VAE.pth, Wan2.2_VAE.pth) into a diffusers
    AutoencoderKLWan directory (ae.from_pretrained), t5_convert the release's models_t5_umt5-xxl-enc-bf16.pth into a UMT5EncoderModel
    directory (text_encoder.from_pretrained), clip_convert its
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth into a CLIPVisionModel directory
    (image_encoder.from_pretrained).

    Args:
        version: wan2.1 or wan2.2.
    """

    WEIGHTS = WAN_WEIGHTS
    VERSIONS = ("wan2.1", "wan2.2")

    def clip_convert(self, cfg: ConvertConfig, num_heads: Optional[int] = None) -> None:
        """Wan's image encoder release file (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth:
        the state dict of its XLMRobertaCLIP) -> a transformers CLIPVisionModel directory
        (config.json, model.safetensors in the file's dtype, preprocessor_config.json with CLIP's
        mean/std) that image_encoder.from_pretrained reads. The vision tower only: the text tower,
        log_scale and visual.head (the image-text projection) are left out, as Wan's I2V never uses
        them. Every tensor is checked against the tower its shapes describe.

        Args:
            cfg: source_path (the .pth file), target_path (the directory to write), overwrite.
            num_heads: the tower's attention heads (no tensor holds them); default width // 80, the
                head width of ViT-H/14 (16 heads for the release).
        """
        from mm.models.image_encoder.clip import CLIP_MEAN, CLIP_STD, check_num_heads
        from mm.models.image_encoder.wan_clip import load_wan_clip_vision
        from mm.models.release_file import UnreadableFile

        start = time.perf_counter()
        source = Path(cfg.source_path)
        if not source.is_file():
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a file (expected Wan's "
                               "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")
        problems = check_num_heads(num_heads)
        if problems:
            raise ConvertError(problems[0].replace("image_encoder.num_heads", "--num_heads"))
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            try:
                model = load_wan_clip_vision(source, None, num_heads, key="--cfg.source_path",
                                             heads_key="--num_heads")
            except UnreadableFile as e:
                raise SourceDataError(str(e)) from None
            except ValueError as e:
                raise ConvertError(str(e)) from None
            config = model.config
            model.save_pretrained(tmp)
            processor = clip_preprocessor_config(config.image_size, CLIP_MEAN, CLIP_STD)
            (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
            default_modes(tmp)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        origin = (f"{source} (CLIP ViT: {config.num_hidden_layers} blocks, width {config.hidden_size}, "
                  f"{config.num_attention_heads} heads, image {config.image_size}, patch {config.patch_size}; "
                  f"{model.wan_clip_note})")
        self._summary("clip_convert", origin, cfg.target_path, None, nbytes, start)

    def t5_convert(self, cfg: ConvertConfig, tokenizer_path: Optional[str] = None) -> None:
        """Wan's text encoder release file (models_t5_umt5-xxl-enc-bf16.pth: the state dict of Wan's
        T5Encoder) -> a transformers UMT5EncoderModel directory (config.json, safetensors, the file's dtype)
        with the tokenizer files copied in: what the model JSON's text_encoder.from_pretrained reads. Every
        size is read from the tensors; missing, unexpected and misshapen tensors are named.

        Args:
            cfg: source_path (the .pth file), target_path (the directory to write), overwrite.
            tokenizer_path: the tokenizer directory (default: google/umt5-xxl beside the .pth, Wan's layout).
        """
        from mm.models.text_encoder.encoder import release_tokenizer_dir
        from mm.models.text_encoder.wan_t5 import umt5_from_original

        start = time.perf_counter()
        source = Path(cfg.source_path)
        if not source.is_file():
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a file (expected Wan's text encoder "
                               "release file, models_t5_umt5-xxl-enc-bf16.pth)")
        try:
            tokenizer = release_tokenizer_dir(source, tokenizer_path, key="--tokenizer_path",
                                              file_key="--cfg.source_path")
        except FileNotFoundError as e:
            raise ConvertError(str(e)) from None
        state = read_torch_state(source)
        try:
            model = umt5_from_original(state, key=f"--cfg.source_path = {cfg.source_path!r}")
        except ValueError as e:
            raise ConvertError(str(e)) from None
        copied = [f for f in TOKENIZER_FILES if (tokenizer / f).is_file()]
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            model.save_pretrained(tmp)
            for name in copied:
                shutil.copyfile(tokenizer / name, tmp / name)
            default_modes(tmp)  # safetensors creates its files 0600
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._summary("t5_convert", f"{source} ({model.config.num_layers} blocks, {model.dtype}; tokenizer "
                      f"{', '.join(copied)} from {tokenizer})", cfg.target_path, None, nbytes, start)

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
        from mm.models.ae.wan_vae import save_wan_vae
        from mm.models.ae.wan_vae_original import load_original_vae
        from mm.models.release_file import UnreadableFile

        start = time.perf_counter()
        source = Path(cfg.source_path)
        if not source.is_file():
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a file (expected Wan's VAE release "
                               "file, e.g. Wan2.1_VAE.pth)")
        given = {"latents_mean": latents_mean, "latents_std": latents_std}
        try:
            vae = load_original_vae(source, None, {k: v for k, v in given.items() if v is not None},
                                    option="--cfg.source_path", prefix="--")
        except UnreadableFile as e:
            raise SourceDataError(str(e)) from None
        except ValueError as e:
            raise ConvertError(str(e)) from None
        vae_cfg, weights = vae.cfg, vae.state_dict()
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            save_wan_vae(vae, str(tmp))
            default_mode(tmp / "diffusion_pytorch_model.safetensors")
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        kind = "Wan2.2, residual" if vae_cfg.is_residual else "Wan2.1"
        self._summary("vae_convert", f"{source} ({len(weights)} tensors, {kind}, z_dim {vae_cfg.z_dim})",
                      cfg.target_path, None, nbytes, start)
