"""Wan's own text encoder release, ``models_t5_umt5-xxl-enc-bf16.pth``, as a transformers ``UMT5EncoderModel``.

The file is ``torch.save`` of the state dict of Wan2.1's ``wan/modules/t5.py`` ``T5Encoder`` as
``umt5_xxl(encoder_only=True)`` builds it: no shared position bias (``shared_pos=False``: every block has
its own relative position embedding), a gated feed-forward with the tanh approximation of GELU, RMS norms
with eps 1e-6, buckets over relative distances up to 128, and no attention scaling; transformers'
``UMT5EncoderModel`` computes the same function. The name table below maps one key set onto the other;
the sizes are read from the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm.models.release_file import read_state_dict

# Wan T5Encoder key -> UMT5EncoderModel key, outside the blocks and inside block {i}
ORIGINAL_TO_UMT5 = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
ORIGINAL_TO_UMT5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU(gate) * fc1
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
UMT5_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # the same tensor as shared.weight
# the constants Wan's t5.py fixes rather than stores: T5RelativeEmbedding(max_dist=128), T5LayerNorm(eps=1e-6),
# T5FeedForward's gate GELU (tanh approximation: transformers' "gelu_new" of "gated-gelu"), dropout 0.1
RELATIVE_MAX_DISTANCE = 128
LAYER_NORM_EPS = 1e-6
FEED_FORWARD_PROJ = "gated-gelu"
DROPOUT = 0.1
# the tensors the sizes are read from (block 0 stands for every block; the key check covers the rest)
SIZE_KEYS = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
             "blocks.0.pos_embedding.embedding.weight")


def original_to_umt5_key(key: str) -> str | None:
    """transformers' name of one Wan T5Encoder key; None for a key outside the table."""
    if key in ORIGINAL_TO_UMT5:
        return ORIGINAL_TO_UMT5[key]
    head, _, rest = key.partition(".")
    index, _, name = rest.partition(".")
    if head == "blocks" and index.isdigit() and name in ORIGINAL_TO_UMT5_BLOCK:
        return f"encoder.block.{int(index)}.{ORIGINAL_TO_UMT5_BLOCK[name]}"
    return None


def umt5_to_original_key(key: str) -> str | None:
    """Wan's name of one UMT5EncoderModel key (the tied ``encoder.embed_tokens`` included); None outside the table."""
    if key == UMT5_TIED_EMBEDDING:
        return "token_embedding.weight"
    for original, umt5 in ORIGINAL_TO_UMT5.items():
        if key == umt5:
            return original
    if key.startswith("encoder.block."):
        index, _, name = key[len("encoder.block."):].partition(".")
        for original, umt5 in ORIGINAL_TO_UMT5_BLOCK.items():
            if index.isdigit() and name == umt5:
                return f"blocks.{int(index)}.{original}"
    return None


def _listing(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _num_blocks(state: dict) -> int:
    indices = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


def umt5_config_from_original(state: dict, key: str = "text_encoder.from_pretrained"):
    """The ``transformers.UMT5Config`` of a Wan T5Encoder state dict: vocabulary and width from
    ``token_embedding``, the attention width from ``attn.q``, the feed-forward width from ``ffn.fc1``, heads
    and buckets from the per-block ``pos_embedding``, the layer count from the block indices; the rest is what
    Wan's code fixes. ``key`` names the source in errors."""
    import transformers

    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{key}: not a state dict (name -> tensor): {_listing(not_tensors)} hold other values")
    absent = [k for k in SIZE_KEYS if k not in state]
    if absent:
        raise ValueError(f"{key}: not a Wan T5Encoder state dict (umt5_xxl, one relative position embedding per "
                         f"block): missing {', '.join(absent)}")
    flat = [f"{k} {list(state[k].shape)}" for k in SIZE_KEYS if state[k].ndim != 2]
    if flat:
        raise ValueError(f"{key}: not a Wan T5Encoder state dict: {', '.join(flat)}, expected 2-D")
    vocab, dim = state["token_embedding.weight"].shape
    dim_attn = state["blocks.0.attn.q.weight"].shape[0]
    dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
    num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    if dim_attn % num_heads:
        raise ValueError(f"{key}: the attention width {dim_attn} (blocks.0.attn.q) is not a multiple of the "
                         f"{num_heads} heads of blocks.0.pos_embedding")
    return transformers.UMT5Config(
        vocab_size=vocab, d_model=dim, d_kv=dim_attn // num_heads, d_ff=dim_ffn, num_layers=_num_blocks(state),
        num_heads=num_heads, relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=RELATIVE_MAX_DISTANCE, feed_forward_proj=FEED_FORWARD_PROJ,
        layer_norm_epsilon=LAYER_NORM_EPS, dropout_rate=DROPOUT, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)


def umt5_from_original(state: dict, dtype: torch.dtype | None = None, key: str = "text_encoder.from_pretrained"):
    """A frozen ``UMT5EncoderModel`` holding a Wan T5Encoder state dict's tensors (cast to ``dtype``; None keeps
    the file's). Every tensor the config implies must be there with its shape and nothing else: missing,
    unexpected and misshapen keys are listed in one error naming ``key``."""
    import transformers

    config = umt5_config_from_original(state, key)
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != UMT5_TIED_EMBEDDING}
    names = {k: original_to_umt5_key(k) for k in state}
    unexpected = sorted(k for k, name in names.items() if name not in expected)
    mapped = {name: state[k] for k, name in names.items() if name in expected}
    missing = sorted(umt5_to_original_key(k) for k in expected if k not in mapped)
    misshapen = [f"{k} {list(state[k].shape)}, expected {list(expected[name])}" for k, name in names.items()
                 if name in expected and tuple(state[k].shape) != expected[name]]
    if missing or unexpected or misshapen:
        problems = [f"{what} ({len(keys)}): {_listing(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
        raise ValueError(f"{key}: the tensors do not match a Wan T5Encoder of {config.num_layers} blocks, width "
                         f"{config.d_model}, {config.num_heads} heads:\n  " + "\n  ".join(problems))
    if dtype is not None:
        mapped = {k: v.to(dtype) for k, v in mapped.items()}
    mapped[UMT5_TIED_EMBEDDING] = mapped["shared.weight"]
    model.load_state_dict(mapped, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def read_original_state(path: str | Path, key: str = "text_encoder.from_pretrained") -> dict[str, torch.Tensor]:
    """The name -> tensor dict of a torch file (``mm.models.release_file``): unreadable, truncated or
    holding anything else is a ValueError naming ``key`` and the path."""
    return read_state_dict(path, key, "Wan's models_t5_umt5-xxl-enc-bf16.pth")


def load_wan_t5(path: str | Path, dtype: torch.dtype | None = None, key: str = "text_encoder.from_pretrained"):
    """A frozen ``UMT5EncoderModel`` from Wan's release file ``models_t5_umt5-xxl-enc-bf16.pth`` (``dtype``: the
    parameters' dtype, None keeps the file's). Errors name ``key`` and the path."""
    return umt5_from_original(read_original_state(path, key), dtype, f"{key} = {str(path)!r}")


def umt5_state_to_original(state_dict: dict) -> dict[str, torch.Tensor]:
    """A ``UMT5EncoderModel`` state dict in Wan's T5Encoder keys (what ``T5Encoder.load_state_dict`` takes):
    the tied ``encoder.embed_tokens`` becomes ``token_embedding`` with ``shared`` (the two must be equal)."""
    out: dict[str, torch.Tensor] = {}
    strangers = sorted(k for k in state_dict if umt5_to_original_key(k) is None)
    if strangers:
        raise ValueError(f"not a UMT5EncoderModel state dict: no Wan T5Encoder name for {_listing(strangers)}")
    for k, v in state_dict.items():
        name = umt5_to_original_key(k)
        if name in out and not torch.equal(out[name], v):
            raise ValueError("shared.weight and encoder.embed_tokens.weight differ: the encoder's embedding is not "
                             "tied, and Wan's T5Encoder has one token_embedding")
        out[name] = v
    return out
