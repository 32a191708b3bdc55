"""WanConverter: Wan2.1 / Wan2.2 DiT weights between HuggingFace layouts and mm checkpoints, and Wan's
CLIP image encoder release file to a transformers directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from checkpoint.config import ConvertConfig, ConvertError, SourceDataError
from checkpoint.converter import DiTConverter
from checkpoint.writers import default_modes, staged_target
from mm.models.predictor.wan.weights import WAN_WEIGHTS


def clip_preprocessor_config(size: int, mean, std) -> dict:
    """A transformers ``CLIPImageProcessor``'s preprocessor_config.json for a tower of ``size`` pixels
    (the values diffusers' Wan I2V ``image_processor`` has: shortest edge ``size``, centre crop,
    bicubic). mm's ``ClipImageEncoder`` reads ``image_mean`` / ``image_std`` and resizes as Wan does."""
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(mean),
            "image_processor_type": "CLIPImageProcessor", "image_std": list(std), "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}


class WanConverter(DiTConverter):
    """Wan2.1 / Wan2.2 DiT weights, and Wan2.1's CLIP image encoder.

    Every variant (Wan2.1 T2V/I2V/FLF2V, Wan2.2 T2V/I2V-A14B experts, TI2V-5B) is read from the
    source: config.json and the tensors present. hf_to_mm reads a diffusers WanTransformer3DModel
    directory or the original Wan release; mm_to_hf writes what WanTransformer3DModel.from_pretrained
    loads. clip_convert turns Wan's models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth into a
    CLIPVisionModel directory (the model JSON's image_encoder.from_pretrained).

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
        from mm.models.image_encoder.wan_clip import ReleaseFileError, load_wan_clip_vision

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
            except ReleaseFileError as e:
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
