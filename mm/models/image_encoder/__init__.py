"""Frozen image encoder (CLIP ViT-H/14 for Wan2.1 I2V / FLF2V) through transformers."""

from mm.models.image_encoder.clip import ClipImageEncoder

__all__ = ["ClipImageEncoder"]
