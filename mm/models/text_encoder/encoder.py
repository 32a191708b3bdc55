"""Text encoder: tokenizer + T5-family encoder from one local directory, frozen.

Wan pads every prompt to 512 tokens and zeroes the embeddings past each prompt's length, so the
DiT's cross-attention sees exact zeros there; ``encode`` does the same (``zero_padding``).
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_ENCODERS = {"umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel", "t5": "T5EncoderModel"}


def check_pretrained_dir(path: str | None, key: str) -> Path:
    """A local model directory; errors name the JSON key (no hub downloads here)."""
    if not path:
        raise ValueError(f"{key} is required: a local directory with config.json and the weights")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key} = {path!r}: no config.json there (a local directory is expected)")
    return p


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def tokenizer_dir(encoder_dir: Path) -> Path:
    """The tokenizer beside a text encoder: in its own directory, or, in diffusers' pipeline layout
    (``text_encoder/`` and ``tokenizer/`` side by side), the sibling ``tokenizer/``."""
    if any((encoder_dir / name).is_file() for name in TOKENIZER_FILES):
        return encoder_dir
    sibling = encoder_dir.parent / "tokenizer"
    if sibling.is_dir():
        return sibling
    raise FileNotFoundError(f"text_encoder.from_pretrained = {str(encoder_dir)!r}: no tokenizer there "
                            f"({', '.join(TOKENIZER_FILES)}) nor in {sibling}")


class HFTextEncoder(torch.nn.Module):
    """What every encoder over a transformers tokenizer and model shares (``TextEncoderLike``): a
    subclass sets ``tokenizer``, ``model`` (its output has ``last_hidden_state``), ``max_length`` and
    ``zero_padding``."""

    tokenizer: object
    model: torch.nn.Module
    max_length: int
    zero_padding: bool

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[b, max_length]``, padded and truncated to ``max_length``."""
        out = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[b, max_length, hidden]`` last hidden states; with ``zero_padding``, zero past each prompt."""
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.zero_padding:
            hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden


class TextEncoder(HFTextEncoder):
    def __init__(self, model_id: str, from_pretrained: str, dtype: str = "bf16", max_length: int = 512,
                 zero_padding: bool = True):
        super().__init__()
        import transformers

        model_id = model_id.lower()  # MindSpeed-MM's JSONs say "MT5"
        if model_id not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder.model_id = {model_id!r}; valid: {', '.join(TEXT_ENCODERS)}")
        if dtype not in DTYPES:
            raise ValueError(f"text_encoder.dtype = {dtype!r}; valid: {', '.join(DTYPES)}")
        path = check_pretrained_dir(from_pretrained, "text_encoder.from_pretrained")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir(path))
        model_cls = getattr(transformers, TEXT_ENCODERS[model_id])
        self.model = model_cls.from_pretrained(path, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        self.max_length, self.zero_padding = max_length, zero_padding
