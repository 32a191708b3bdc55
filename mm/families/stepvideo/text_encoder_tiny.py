"""Tiny randomly initialised Step-Video text encoders written as the release lays them out, for demos
and tests where no model hub can be reached: a Step-LLM directory (config.json with the release's key
names, sharded safetensors + index, a tokenizer) and a HunyuanCLIP directory (``clip_text_encoder/``
with a tiny BertModel, ``tokenizer/`` with a vocab.txt)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

TINY_SENTENCES = (
    "a cat runs over the red ball",
    "the blue dog jumps under the sky",
    "a camera moves slowly around the old house",
    "a red ball quickly rolls down the hill",
    "two birds fly over the green field at sunset",
    "the dog and the cat play in the snow",
)


def _words(sentences) -> list[str]:
    return list(dict.fromkeys(w for s in sentences for w in s.split()))


def have_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def save_tiny_step_llm_tokenizer(path: str | Path, sentences=TINY_SENTENCES, kind: str = "auto",
                                 vocab_size: int = 48) -> Path:
    """A tokenizer in ``path`` with unk 0, BOS 1, EOS 2: ``kind`` ``"sentencepiece"`` trains a BPE
    ``step1_chat_tokenizer.model`` on ``sentences`` in-process; ``"json"`` writes a word-level
    ``tokenizer.json``; ``"auto"``: sentencepiece when the package is installed. Returns the file."""
    from mm.families.stepvideo.text_encoders import STEP_LLM_TOKENIZER_FILE, STEP_LLM_TOKENIZER_JSON

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "auto":
        kind = "sentencepiece" if have_sentencepiece() else "json"
    if kind == "sentencepiece":
        import sentencepiece

        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(list(sentences) * 4), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
        out = path / STEP_LLM_TOKENIZER_FILE
        out.write_bytes(model.getvalue())
        return out
    if kind == "json":
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(_words(sentences))}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        out = path / STEP_LLM_TOKENIZER_JSON
        tok.save(str(out))
        return out
    raise ValueError(f"kind = {kind!r}; valid: auto, sentencepiece, json")


def tiny_step_llm_state(config, seed: int = 0) -> dict:
    """Random fp32 weights (release names) for a ``StepLLMConfig``, norms away from 1."""
    import torch

    from mm.families.stepvideo.text_encoders import StepLLM

    torch.manual_seed(seed)
    model = StepLLM(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "word_embeddings" in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_tiny_step_llm(path: str | Path, sentences=TINY_SENTENCES, hidden_size: int = 48, num_attention_heads: int = 6,
                       num_attention_groups: int = 2, num_layers: int = 2, ffn_hidden_size: int = 80,
                       shards: int = 2, tokenizer: str = "auto", seed: int = 0) -> Path:
    """A Step-LLM directory at ``path``: config.json, ``shards`` safetensors files (with
    ``model.safetensors.index.json`` when more than one) and a tokenizer (see
    ``save_tiny_step_llm_tokenizer``). The default 6 heads are not a power of two."""
    from safetensors.torch import save_file

    from mm.families.stepvideo.text_encoders import StepLLMConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_file = save_tiny_step_llm_tokenizer(path, sentences, tokenizer)
    if tok_file.suffix == ".model":
        import sentencepiece

        pieces = sentencepiece.SentencePieceProcessor(model_file=str(tok_file)).get_piece_size()
    else:
        pieces = len(json.loads(tok_file.read_text())["model"]["vocab"])
    config = StepLLMConfig(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                           num_attention_groups=num_attention_groups, num_layers=num_layers,
                           ffn_hidden_size=ffn_hidden_size, padded_vocab_size=16 * math.ceil(pieces / 16),
                           layernorm_epsilon=1e-5)
    # the release's further keys, which the model does not read
    extra = {"seq_length": 320, "use_flash_attn": True, "attention_dropout": 0.0, "hidden_dropout": 0.0,
             "embedding_weights_in_fp32": False}
    (path / "config.json").write_text(json.dumps({**config.to_dict(), **extra}, indent=2))
    state = tiny_step_llm_state(config, seed)
    names = list(state)
    if shards <= 1:
        save_file(state, str(path / "model.safetensors"))
        return path
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({n: state[n] for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return path


def save_tiny_hunyuan_clip(path: str | Path, sentences=TINY_SENTENCES, hidden_size: int = 16, num_layers: int = 2,
                           num_heads: int = 2, seed: int = 0) -> Path:
    """A HunyuanCLIP directory at ``path``: ``clip_text_encoder/`` (tiny random BertModel, 128
    positions) and ``tokenizer/`` (vocab.txt over the words of ``sentences``)."""
    import torch
    from transformers import BertConfig, BertModel

    path = Path(path)
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_words(sentences)]
    (path / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (path / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, indent=2))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=2 * hidden_size, max_position_embeddings=128)
    BertModel(config).save_pretrained(path / "clip_text_encoder")
    return path
