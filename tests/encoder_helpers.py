"""Tiny random text/image encoders saved as local directories, as the model JSON names them."""

from __future__ import annotations

from pathlib import Path

WORDS = "a cat dog runs jumps over the red blue ball under sky camera slowly quickly".split()


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def save_text_encoder(path: Path, kind: str = "umt5") -> Path:
    import torch
    import transformers

    config_cls = {"umt5": transformers.UMT5Config, "mt5": transformers.MT5Config}[kind]
    model_cls = {"umt5": transformers.UMT5EncoderModel, "mt5": transformers.MT5EncoderModel}[kind]
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(WORDS) + 3, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model_cls(config).save_pretrained(path)
    save_tokenizer(path)
    return path


def save_clip(path: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=28, patch_size=14, projection_dim=8)).save_pretrained(path)
    return path
