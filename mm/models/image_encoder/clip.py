"""CLIP vision encoder as Wan2.1 I2V / FLF2V uses it: the penultimate layer's hidden states of every token.

``image_encoder.from_pretrained`` is a transformers ``CLIPVisionModel`` directory (e.g. a diffusers
pipeline's ``image_encoder/``, or what ``mm-convert WanConverter clip_convert`` writes) or Wan's own
release file ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, read by ``wan_clip``
(``image_encoder.num_heads``: its head count, 16 for ViT-H/14 when left out).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mm.models.text_encoder.encoder import DTYPES, check_pretrained_dir

# OpenAI CLIP normalisation (open-clip's for ViT-H/14, the values Wan's clip.py gives its transforms), used
# for Wan's release file and when a directory has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_num_heads(num_heads) -> list[str]:
    """Problems with the image_encoder section's ``num_heads`` (None: left out)."""
    if num_heads is None or (isinstance(num_heads, int) and not isinstance(num_heads, bool) and num_heads >= 1):
        return []
    return [f"image_encoder.num_heads = {num_heads!r}; valid: a positive integer (the attention heads of Wan's "
            "CLIP release file; 16 for ViT-H/14, which width // 80 gives when left out)"]


class ClipImageEncoder(torch.nn.Module):
    """Frozen ``CLIPVisionModel`` from ``from_pretrained`` (a directory, or Wan's release ``.pth``)."""

    def __init__(self, from_pretrained: str, dtype: str = "bf16", num_heads: int | None = None):
        super().__init__()
        from transformers import CLIPVisionModel

        if dtype not in DTYPES:
            raise ValueError(f"image_encoder.dtype = {dtype!r}; valid: {', '.join(DTYPES)}")
        problems = check_num_heads(num_heads)
        if problems:
            raise ValueError(problems[0])
        mean, std = CLIP_MEAN, CLIP_STD
        if from_pretrained and Path(from_pretrained).is_file():
            from mm.models.image_encoder.wan_clip import load_wan_clip_vision

            self.model = load_wan_clip_vision(from_pretrained, DTYPES[dtype], num_heads)
        else:
            if from_pretrained and not Path(from_pretrained).exists():
                raise FileNotFoundError(f"image_encoder.from_pretrained = {from_pretrained!r}: no such file or "
                                        "directory (a CLIPVisionModel directory, or Wan's release file "
                                        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")
            path = check_pretrained_dir(from_pretrained, "image_encoder.from_pretrained")
            if num_heads is not None:
                heads = json.loads((path / "config.json").read_text()).get("num_attention_heads")
                if heads != num_heads:
                    raise ValueError(f"image_encoder.num_heads = {num_heads} but {path / 'config.json'} says "
                                     f"num_attention_heads {heads}; num_heads is for Wan's release .pth (leave it out)")
            self.model = CLIPVisionModel.from_pretrained(path, dtype=DTYPES[dtype])
            processor = path / "preprocessor_config.json"
            if processor.is_file():
                cfg = json.loads(processor.read_text())
                mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.model = self.model.eval().requires_grad_(False)
        self.size = self.model.config.image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_section(cls, section) -> "ClipImageEncoder":
        """From the model JSON's ``image_encoder`` section (``from_pretrained``, ``dtype`` (fp32 when
        left out), ``num_heads``)."""
        return cls(section.from_pretrained, section.dtype or "fp32", section.params.get("num_heads"))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` in [-1, 1] -> CLIP's normalised ``[b, 3, size, size]``, as Wan's
        ``CLIPModel.visual`` does it: a bicubic resize of the whole image (``align_corners=False``, no
        antialiasing) in float32, ``x * 0.5 + 0.5`` (no clamp: the resize's overshoot stays), then
        ``(x - mean) / std``."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, tokens, hidden]``: penultimate hidden states (class token and patches)."""
        param = next(self.model.parameters())
        pixels = self.preprocess(images.to(param.device)).to(param.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
