"""Frozen text encoders (UMT5-XXL for Wan, mT5-XXL for OpenSoraPlan) through transformers, from a
local directory named by the model JSON's ``text_encoder.from_pretrained``."""

from mm.models.text_encoder.encoder import TEXT_ENCODERS, TextEncoder

__all__ = ["TEXT_ENCODERS", "TextEncoder"]
