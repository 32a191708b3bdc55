"""Tiny randomly initialised T5-family text encoders with a word-level tokenizer, written as a
local directory ``TextEncoder`` loads: for demos (the quickstart) and tests, where no model hub
can be reached."""

from __future__ import annotations

from pathlib import Path


def save_tiny_text_encoder(path: str | Path, words: list[str], kind: str = "umt5", d_model: int = 16,
                           seed: int = 0) -> Path:
    """Tokenizer over ``words`` (plus <pad>, </s>, <unk>) and a 2-layer random encoder at ``path``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    path = Path(path)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)
    config_cls = {"umt5": transformers.UMT5Config, "mt5": transformers.MT5Config}[kind]
    model_cls = {"umt5": transformers.UMT5EncoderModel, "mt5": transformers.MT5EncoderModel}[kind]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=len(vocab), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    model_cls(config).save_pretrained(path)
    return path
