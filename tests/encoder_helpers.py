"""Tiny random text/image encoders saved as local directories, as the model JSON names them."""

from __future__ import annotations

from pathlib import Path

from mm.models.text_encoder.tiny import save_tiny_text_encoder

WORDS = "a cat dog runs jumps over the red blue ball under sky camera slowly quickly".split()


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over WORDS (with a throwaway tiny encoder beside it)."""
    save_tiny_text_encoder(path, WORDS)


def save_text_encoder(path: Path, kind: str = "umt5") -> Path:
    return save_tiny_text_encoder(path, WORDS, kind=kind)


def save_clip(path: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=28, patch_size=14, projection_dim=8)).save_pretrained(path)
    return path
