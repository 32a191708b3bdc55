"""Text encoder: tokenizer + T5-family encoder, frozen: from a transformers directory, or from Wan's own
release file ``models_t5_umt5-xxl-enc-bf16.pth`` with its tokenizer directory ``google/umt5-xxl`` beside it.

Wan pads every prompt to 512 tokens and zeroes the embeddings past each prompt's length, so the
DiT's cross-attention sees exact zeros there; ``encode`` does the same (``zero_padding``). A family may
clean every prompt before it is tokenized (``clean``: Wan's ``mm.models.text_encoder.prompt_clean``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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
WAN_TOKENIZER_DIR = Path("google", "umt5-xxl")  # Wan's checkpoint directory: the tokenizer beside the .pth


def holds_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def release_tokenizer_dir(release_file: str | Path, tokenizer: str | None, key: str = "text_encoder.tokenizer",
                          file_key: str = "text_encoder.from_pretrained") -> Path:
    """The tokenizer of Wan's release file ``models_t5_umt5-xxl-enc-bf16.pth``: ``tokenizer`` when given, else
    ``google/umt5-xxl`` beside the file (Wan's checkpoint directory). ``key`` and ``file_key`` name the two
    settings in errors."""
    default = Path(release_file).parent / WAN_TOKENIZER_DIR
    chosen = Path(tokenizer) if tokenizer else default
    if holds_tokenizer(chosen):
        return chosen
    files = ", ".join(TOKENIZER_FILES)
    if tokenizer:
        raise FileNotFoundError(f"{key} = {tokenizer!r}: no tokenizer directory there ({files}); without {key}, "
                                f"the tokenizer is read from {str(default)!r} (Wan's layout: google/umt5-xxl beside "
                                f"{file_key} = {str(release_file)!r})")
    raise FileNotFoundError(f"{key} is not set and {str(default)!r} (Wan's layout: google/umt5-xxl beside "
                            f"{file_key} = {str(release_file)!r}) holds no tokenizer ({files}); set {key} to the "
                            "tokenizer directory")


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
    clean: Callable[[str], str] | None = None  # applied to every prompt before it is tokenized

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[b, max_length]``, padded and truncated to ``max_length``."""
        if self.clean is not None:
            prompts = [self.clean(p) for p in prompts]
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
    """A T5-family encoder (``model_id``) from ``from_pretrained``: a transformers directory (its tokenizer in
    it or in the sibling ``tokenizer/``), or, for ``umt5``, Wan's release file ``models_t5_umt5-xxl-enc-bf16.pth``
    (``mm.models.text_encoder.wan_t5``; its tokenizer in ``google/umt5-xxl`` beside it). ``tokenizer``: the
    tokenizer directory instead (the model JSON's ``text_encoder.tokenizer``)."""

    def __init__(self, model_id: str, from_pretrained: str, dtype: str = "bf16", max_length: int = 512,
                 zero_padding: bool = True, tokenizer: str | None = None, clean: Callable[[str], str] | None = None):
        super().__init__()
        import transformers

        model_id = model_id.lower()  # MindSpeed-MM's JSONs say "MT5"
        if model_id not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder.model_id = {model_id!r}; valid: {', '.join(TEXT_ENCODERS)}")
        if dtype not in DTYPES:
            raise ValueError(f"text_encoder.dtype = {dtype!r}; valid: {', '.join(DTYPES)}")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise ValueError(f"text_encoder.tokenizer = {tokenizer!r}; valid: a tokenizer directory (a string)")
        if from_pretrained and Path(from_pretrained).is_file():
            from mm.models.text_encoder.wan_t5 import load_wan_t5

            if model_id != "umt5":
                raise ValueError(f"text_encoder.from_pretrained = {from_pretrained!r} is a file, read as Wan's "
                                 f"release file models_t5_umt5-xxl-enc-bf16.pth: a UMT5 encoder, but "
                                 f"text_encoder.model_id = {model_id!r}; valid: umt5, or a directory for {model_id}")
            tokenizer_path = release_tokenizer_dir(from_pretrained, tokenizer)
            self.model = load_wan_t5(from_pretrained, DTYPES[dtype])
        else:
            if from_pretrained and not Path(from_pretrained).exists():
                raise FileNotFoundError(f"text_encoder.from_pretrained = {from_pretrained!r}: no such file or "
                                        "directory (a transformers directory, or Wan's "
                                        "models_t5_umt5-xxl-enc-bf16.pth)")
            path = check_pretrained_dir(from_pretrained, "text_encoder.from_pretrained")
            if tokenizer and not holds_tokenizer(Path(tokenizer)):
                raise FileNotFoundError(f"text_encoder.tokenizer = {tokenizer!r}: no tokenizer directory there "
                                        f"({', '.join(TOKENIZER_FILES)})")
            tokenizer_path = Path(tokenizer) if tokenizer else tokenizer_dir(path)
            model_cls = getattr(transformers, TEXT_ENCODERS[model_id])
            self.model = model_cls.from_pretrained(path, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_length, self.zero_padding, self.clean = max_length, zero_padding, clean
