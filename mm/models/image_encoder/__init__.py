"""Frozen image encoder (CLIP ViT-H/14 for Wan2.1 I2V / FLF2V) through transformers: from a
``CLIPVisionModel`` directory or Wan's release file (``wan_clip``)."""

from mm.models.image_encoder.clip import ClipImageEncoder, check_num_heads

__all__ = ["ClipImageEncoder", "check_num_heads"]
