"""CLIP vision encoder as Wan2.1 I2V uses it: the penultimate layer's hidden states of every token."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from mm.models.text_encoder.encoder import DTYPES, check_pretrained_dir

# OpenAI CLIP normalisation, used when the directory has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageEncoder(torch.nn.Module):
    def __init__(self, from_pretrained: str, dtype: str = "bf16"):
        super().__init__()
        from transformers import CLIPVisionModel

        path = check_pretrained_dir(from_pretrained, "image_encoder.from_pretrained")
        if dtype not in DTYPES:
            raise ValueError(f"image_encoder.dtype = {dtype!r}; valid: {', '.join(DTYPES)}")
        self.model = CLIPVisionModel.from_pretrained(path, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        self.size = self.model.config.image_size
        mean, std = CLIP_MEAN, CLIP_STD
        processor = path / "preprocessor_config.json"
        if processor.is_file():
            cfg = json.loads(processor.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` in [-1, 1] -> CLIP's normalised ``[b, 3, size, size]`` (bicubic resize)."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x.clamp(-1, 1) + 1) / 2
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, tokens, hidden]``: penultimate hidden states (class token and patches)."""
        param = next(self.model.parameters())
        pixels = self.preprocess(images.to(param.device)).to(param.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
