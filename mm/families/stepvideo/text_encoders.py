"""Step-Video-T2V's two text encoders, each a ``mm.families.spec.TextEncoderLike`` (``max_length``,
``tokenize``, ``encode``), and the factory that builds one from a ``text_encoder`` entry of the model
JSON (``stepvideo_text_encoder``, picked by ``model_id``).

- Step-LLM (``model_id`` ``"StepLLmModel"``): a decoder-only LLM read as an encoder. Token embedding,
  then per layer ``x + Attn(RMSNorm(x))`` and ``h + SwiGLU(RMSNorm(h))``; no position embedding and no
  final norm: the output is the last layer's hidden states ``[b, 320, hidden]``. Attention is
  grouped-query with one fused ``wqkv`` projection (all query heads, then per key/value group its
  ``[k | v]``), causal, with a per-head bias ``-sqrt(i - j) * slope[h]`` added to the scaled scores.
  Tokens: ``[BOS=1] + ids[:max_length - 2] + [EOS=2]``, padded with 2; the mask marks BOS..EOS.
  The release directory (``step_llm/``): ``config.json``, ``*.safetensors`` (with or without a
  ``*.safetensors.index.json``), ``step1_chat_tokenizer.model`` (sentencepiece).
- HunyuanCLIP (``model_id`` ``"BertModel"``): transformers ``BertModel`` + ``BertTokenizer``,
  ``last_hidden_state [b, 77, 1024]``, fp32 by default. Release: ``hunyuan_clip/clip_text_encoder``
  and ``hunyuan_clip/tokenizer``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.models.text_encoder.encoder import HFTextEncoder

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

STEP_LLM_MAX_LENGTH = 320
CLIP_MAX_LENGTH = 77
STEP_LLM_TOKENIZER_FILE = "step1_chat_tokenizer.model"
STEP_LLM_TOKENIZER_JSON = "tokenizer.json"  # a tokenizers-library file, used when sentencepiece is absent
SENTENCEPIECE_PIN = "sentencepiece==0.2.3"
FFN_MULTIPLE_OF = 256  # the FFN width is ffn_hidden_size rounded up to a multiple of this


def _dtype(value: str | torch.dtype, key: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"{key} = {value!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[value]


# --------------------------------------------------------------------------------------------
# Step-LLM: configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepLLMConfig:
    """The architecture keys of the release's ``step_llm/config.json`` (other keys there are not read)."""

    hidden_size: int
    num_attention_heads: int
    num_attention_groups: int  # key/value heads
    num_layers: int
    ffn_hidden_size: int  # rounded up to a multiple of 256 for the FFN width
    padded_vocab_size: int  # rows of the embedding table
    layernorm_epsilon: float
    fp32_residual_connection: bool = False  # the residual stream in fp32, the layers in the weights' dtype

    OPTIONAL = ("fp32_residual_connection",)

    def __post_init__(self):
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{f.name} = {value!r}: expected a positive integer")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(f"hidden_size = {self.hidden_size} is not a multiple of num_attention_heads = "
                                f"{self.num_attention_heads}")
            if self.num_attention_heads % self.num_attention_groups:
                problems.append(f"num_attention_heads = {self.num_attention_heads} is not a multiple of "
                                f"num_attention_groups = {self.num_attention_groups}")
        if not isinstance(self.layernorm_epsilon, (int, float)) or isinstance(self.layernorm_epsilon, bool) \
                or self.layernorm_epsilon <= 0:
            problems.append(f"layernorm_epsilon = {self.layernorm_epsilon!r}: expected a positive number")
        if not isinstance(self.fp32_residual_connection, bool):
            problems.append(f"fp32_residual_connection = {self.fp32_residual_connection!r}: expected true or false")
        if problems:
            raise ValueError("Step-LLM config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        return FFN_MULTIPLE_OF * math.ceil(self.ffn_hidden_size / FFN_MULTIPLE_OF)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> "StepLLMConfig":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in cls.OPTIONAL]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; a Step-LLM config needs "
                             f"{', '.join(n for n in names if n not in cls.OPTIONAL)}")
        try:
            return cls(**{n: data[n] for n in names if n in data})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "StepLLMConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# Step-LLM: the sqrt-ALiBi attention bias
# --------------------------------------------------------------------------------------------

def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-head slopes ``[num_heads]``: with ``n`` the largest power of two <= ``num_heads``,
    ``2^(-8k/n)`` for ``k = 1..n``, then ``2^(-4k/n)`` for odd ``k = 1, 3, 5, ...`` for the remaining heads."""
    if num_heads < 1:
        raise ValueError(f"num_heads = {num_heads}: expected >= 1")
    n = 1 << (num_heads.bit_length() - 1)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    slopes = torch.exp2(-8.0 * k / n)
    if n < num_heads:
        odd = torch.arange(1, 2 * (num_heads - n), 2, dtype=torch.float64)
        slopes = torch.cat([slopes, torch.exp2(-4.0 * odd / n)])
    return slopes.to(dtype)


def sqrt_alibi_bias(num_heads: int, seq_len: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias ``[num_heads, seq_len, seq_len]``: query ``i``, key ``j``:
    ``-sqrt(i - j) * slope[h]`` for ``j <= i``, ``-inf`` for ``j > i`` (causal)."""
    pos = torch.arange(seq_len, device=device, dtype=dtype)
    distance = pos[:, None] - pos[None, :]
    causal = distance >= 0
    bias = -torch.sqrt(distance.clamp(min=0))[None] * alibi_slopes(num_heads, dtype).to(device)[:, None, None]
    return bias.masked_fill(~causal[None], float("-inf"))


# --------------------------------------------------------------------------------------------
# Step-LLM: the model
# --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """``x / rms(x)`` in fp32 (or the input's dtype if wider), cast back to the input's dtype, then
    times the weight."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class StepLLMAttention(nn.Module):
    """Grouped-query self-attention with the sqrt-ALiBi bias. ``wqkv`` rows: the query heads
    (``hidden``), then per key/value group ``[k (head_dim) | v (head_dim)]``; query head ``h`` reads
    group ``h // (heads / groups)``. Scores, bias and softmax are computed in fp32 (or the weights'
    dtype if wider); ``bias`` is in that dtype."""

    def __init__(self, config: StepLLMConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_attention_groups, config.head_dim
        d = config.hidden_size
        self.wqkv = nn.Linear(d, d + 2 * self.groups * self.head_dim, bias=False, dtype=dtype)
        self.wo = nn.Linear(d, d, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, kv = self.wqkv(x).split([d, 2 * self.groups * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(b, s, self.groups, 2 * self.head_dim).transpose(1, 2).chunk(2, dim=-1)
        per_group = self.heads // self.groups
        if per_group > 1:
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        core = bias.dtype
        out = F.scaled_dot_product_attention(q.to(core), k.to(core), v.to(core), attn_mask=bias[None])
        return self.wo(out.to(x.dtype).transpose(1, 2).reshape(b, s, d))


class StepLLMFeedForward(nn.Module):
    """SwiGLU: ``w1`` rows ``[gate | up]``, ``w2(silu(gate) * up)``."""

    def __init__(self, config: StepLLMConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, 2 * config.ffn_dim, bias=False, dtype=dtype)
        self.w2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class StepLLMBlock(nn.Module):
    def __init__(self, config: StepLLMConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype)
        self.attention = StepLLMAttention(config, dtype)
        self.ffn_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype)
        self.feed_forward = StepLLMFeedForward(config, dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        compute = self.attention.wo.weight.dtype
        h = x + self.attention(self.attention_norm(x).to(compute), bias)
        return h + self.feed_forward(self.ffn_norm(h).to(compute))


class StepLLM(nn.Module):
    """Step-LLM as a text encoder: ``input_ids [b, s]`` -> the last layer's hidden states
    ``[b, s, hidden]``. Parameter names are the release's (``tok_embeddings.word_embeddings.weight``,
    ``transformer.layers.N.{attention_norm, attention.wqkv, attention.wo, ffn_norm, feed_forward.w1,
    feed_forward.w2}.weight``).

    The attention is causal and reads no padding mask, as the reference's does: the tokenizer pads at
    the end, so causality already keeps the padding out of every prompt token's attention, and the
    padding positions attend to everything before them."""

    def __init__(self, config: StepLLMConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.ModuleDict(
            {"word_embeddings": nn.Embedding(config.padded_vocab_size, config.hidden_size, dtype=dtype)})
        self.transformer = nn.ModuleDict(
            {"layers": nn.ModuleList(StepLLMBlock(config, dtype) for _ in range(config.num_layers))})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` is accepted for the encoder call's shape and not read (see the class doc)."""
        del attention_mask
        x = self.tok_embeddings["word_embeddings"](input_ids)
        if self.config.fp32_residual_connection:
            x = x.float()
        core = torch.promote_types(self.tok_embeddings["word_embeddings"].weight.dtype, torch.float32)
        bias = sqrt_alibi_bias(self.config.num_attention_heads, input_ids.shape[1], x.device, core)
        for layer in self.transformer["layers"]:
            x = layer(x, bias)
        return x


# --------------------------------------------------------------------------------------------
# Step-LLM: loading the release
# --------------------------------------------------------------------------------------------

def _listing(names, limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def safetensors_weight_map(path: str | Path) -> dict[str, Path]:
    """Weight name -> the ``.safetensors`` file holding it, from the directory's
    ``*.safetensors.index.json`` if there is one, else from the headers of its ``*.safetensors`` files."""
    from safetensors import safe_open

    path = Path(path)
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{path}: several safetensors indexes ({', '.join(p.name for p in indexes)}); keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{indexes[0]}: not a safetensors index with a weight_map ({e!r})") from None
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise FileNotFoundError(f"{indexes[0]} names file(s) not in {path}: {', '.join(absent)}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors files (nor a *.safetensors.index.json)")
    files: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name in files:
                    raise ValueError(f"{path}: weight {name!r} is in both {files[name].name} and {shard.name}")
                files[name] = shard
    return files


def load_step_llm(path: str | Path, dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str = "cpu",
                  key: str = "text_encoder.from_pretrained") -> StepLLM:
    """The frozen Step-LLM of a release directory, its parameters in ``dtype`` on ``device``.

    The model is built without memory (meta device); each weight is read from its file, cast to
    ``dtype`` and placed, one tensor at a time, so the host never holds more than the model in
    ``dtype`` plus one weight as stored. The weight names must be exactly the model's: missing and
    unexpected names are listed in the error, before any weight is read."""
    from safetensors import safe_open

    dtype = _dtype(dtype, "text_encoder.dtype")
    if not path:
        raise ValueError(f"{key} is required: the Step-LLM directory (config.json, *.safetensors)")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{key} = {str(path)!r}: no config.json there (the Step-LLM directory, step_llm/, "
                                "is expected)")
    config = StepLLMConfig.from_json(path / "config.json")
    files = safetensors_weight_map(path)
    with torch.device("meta"):
        model = StepLLM(config, dtype=dtype)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    missing, unexpected = set(shapes) - set(files), set(files) - set(shapes)
    if missing or unexpected:
        parts = [f"{key} = {str(path)!r}: the weights do not match the Step-LLM of its config.json"]
        if missing:
            parts.append(f"missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_listing(unexpected)}")
        raise ValueError("; ".join(parts))
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            held = set(f.keys())
            absent = [n for n in names if n not in held]
            if absent:
                raise ValueError(f"{file}: the index places {_listing(absent)} in this file, which does not hold it")
            for name in names:
                tensor = f.get_tensor(name)
                if tensor.shape != shapes[name]:
                    raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}; the config gives "
                                     f"{tuple(shapes[name])}")
                module_name, _, param_name = name.rpartition(".")
                module = model.get_submodule(module_name)
                setattr(module, param_name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
                del tensor
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Step-LLM: the tokenizer
# --------------------------------------------------------------------------------------------

class StepLLMTokenizer:
    """Step-LLM's token ids: ``[BOS=1] + ids[:max_length - 2] + [EOS=2]``, padded with 2 to
    ``max_length``; the mask is 1 from BOS to EOS. ``ids`` come from sentencepiece on
    ``step1_chat_tokenizer.model``, or, without the sentencepiece package, from a tokenizers-library
    ``tokenizer.json`` beside it (without special tokens added).

    ``path``: the ``step_llm`` directory, the ``.model`` file (as a data JSON's
    ``tokenizer_config.from_pretrained`` names it), or a ``tokenizer.json``."""

    BOS, EOS, PAD = 1, 2, 2

    def __init__(self, path: str | Path, key: str = "tokenizer_config.from_pretrained"):
        if not path:
            raise ValueError(f"{key} is required: the Step-LLM tokenizer ({STEP_LLM_TOKENIZER_FILE}, or its directory)")
        path = Path(path)
        if path.is_dir():
            model_file, json_file = path / STEP_LLM_TOKENIZER_FILE, path / STEP_LLM_TOKENIZER_JSON
        elif path.suffix == ".json":
            model_file, json_file = None, path
        else:
            model_file, json_file = path, path.parent / STEP_LLM_TOKENIZER_JSON
        self._sp = self._fast = None
        if model_file is not None and model_file.is_file():
            try:
                import sentencepiece
            except ImportError:
                sentencepiece = None
            if sentencepiece is not None:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
                self.source = model_file
                return
            if not json_file.is_file():
                raise ImportError(f"{key} = {str(path)!r}: reading {model_file.name} needs the sentencepiece package "
                                  f"({SENTENCEPIECE_PIN}, in requirements/runtime.txt), or a tokenizers-library "
                                  f"{STEP_LLM_TOKENIZER_JSON} beside it; neither is there")
        if json_file.is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(json_file))
            self.source = json_file
            return
        raise FileNotFoundError(f"{key} = {str(path)!r}: no {STEP_LLM_TOKENIZER_FILE} (nor {STEP_LLM_TOKENIZER_JSON}) "
                                "there")

    def text_ids(self, text: str) -> list[int]:
        """The ids of ``text`` alone (no BOS / EOS)."""
        if self._sp is not None:
            return list(self._sp.encode_as_ids(text))
        return list(self._fast.encode(text, add_special_tokens=False).ids)

    def tokenize(self, prompts: list[str] | str, max_length: int = STEP_LLM_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[b, max_length]`` (int64)."""
        if max_length < 2:
            raise ValueError(f"Step-LLM max_length = {max_length}: BOS and EOS need at least 2")
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), max_length), self.PAD, dtype=torch.long)
        mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [self.BOS, *self.text_ids(prompt)[:max_length - 2], self.EOS]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return ids, mask

    def __call__(self, text: list[str] | str, max_length: int = STEP_LLM_MAX_LENGTH, padding: str = "max_length",
                 truncation: bool = True, return_tensors: str = "pt", **_ignored):
        """A transformers-tokenizer-like call (``.input_ids``, ``.attention_mask``); only padding to
        ``max_length`` with truncation, as PyTorch tensors."""
        from transformers import BatchEncoding

        if padding != "max_length" or not truncation or return_tensors != "pt":
            raise ValueError(f"StepLLMTokenizer pads to max_length and truncates, into PyTorch tensors; got "
                             f"padding={padding!r}, truncation={truncation!r}, return_tensors={return_tensors!r}")
        ids, mask = self.tokenize(text, max_length)
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


# --------------------------------------------------------------------------------------------
# The encoders as the loops use them
# --------------------------------------------------------------------------------------------

class StepLLMEncoder(nn.Module):
    """Step-LLM + its tokenizer (``TextEncoderLike``): ``encode`` gives ``[b, max_length, hidden]`` in
    the model's dtype; with ``zero_padding`` the positions past each prompt's EOS are zero."""

    def __init__(self, from_pretrained: str | Path, dtype: str | torch.dtype = "bf16",
                 max_length: int = STEP_LLM_MAX_LENGTH, zero_padding: bool = False,
                 tokenizer: str | Path | None = None, key: str = "text_encoder.from_pretrained"):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"Step-LLM max_length = {max_length}: BOS and EOS need at least 2")
        self.model = load_step_llm(from_pretrained, _dtype(dtype, "text_encoder.dtype"), key=key)
        self.tokenizer = StepLLMTokenizer(tokenizer or from_pretrained, key=key if tokenizer is None else "tokenizer")
        self.max_length, self.zero_padding = max_length, zero_padding

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer.tokenize(prompts, self.max_length)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.model.tok_embeddings["word_embeddings"].weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.model(input_ids, attention_mask)
        if self.zero_padding:
            hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden


def hunyuan_clip_dirs(path: str | Path, key: str = "text_encoder.from_pretrained") -> tuple[Path, Path]:
    """(BertModel directory, BertTokenizer directory) of ``path``: the ``hunyuan_clip`` directory
    (``clip_text_encoder/`` and ``tokenizer/`` inside), or ``hunyuan_clip/clip_text_encoder`` itself
    (its tokenizer in it or in the sibling ``tokenizer/``)."""
    if not path:
        raise ValueError(f"{key} is required: the HunyuanCLIP directory (hunyuan_clip/ or "
                         "hunyuan_clip/clip_text_encoder)")
    path = Path(path)
    if (path / "config.json").is_file():
        encoder = path
    elif (path / "clip_text_encoder" / "config.json").is_file():
        encoder = path / "clip_text_encoder"
    else:
        raise FileNotFoundError(f"{key} = {str(path)!r}: no config.json there nor in clip_text_encoder/ (the "
                                "HunyuanCLIP BertModel directory is expected)")
    for candidate in (encoder, encoder.parent / "tokenizer"):
        if (candidate / "vocab.txt").is_file() or (candidate / "tokenizer.json").is_file():
            return encoder, candidate
    raise FileNotFoundError(f"{key} = {str(path)!r}: no BertTokenizer (vocab.txt or tokenizer.json) in {encoder} "
                            f"nor in {encoder.parent / 'tokenizer'}")


class HunyuanCLIPEncoder(HFTextEncoder):
    """HunyuanCLIP (``TextEncoderLike``): BertTokenizer to ``max_length`` ([CLS] ... [SEP], padded),
    ``encode`` gives BertModel's ``last_hidden_state [b, max_length, hidden]`` (the pooler is unused);
    with ``zero_padding`` the padded positions are zero."""

    def __init__(self, from_pretrained: str | Path, dtype: str | torch.dtype = "fp32",
                 max_length: int = CLIP_MAX_LENGTH, zero_padding: bool = False,
                 tokenizer: str | Path | None = None, key: str = "text_encoder.from_pretrained"):
        super().__init__()
        from transformers import BertModel, BertTokenizer

        encoder_dir, tokenizer_dir = hunyuan_clip_dirs(from_pretrained, key)
        self.tokenizer = BertTokenizer.from_pretrained(str(tokenizer or tokenizer_dir))
        model, info = BertModel.from_pretrained(str(encoder_dir), dtype=_dtype(dtype, "text_encoder.dtype"),
                                                output_loading_info=True)
        missing = [k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")]
        if missing or info.get("mismatched_keys"):
            raise ValueError(f"{key} = {str(encoder_dir)!r}: BertModel weights missing: {_listing(missing)}"
                             + (f"; mismatched: {info['mismatched_keys']}" if info.get("mismatched_keys") else ""))
        limit = model.config.max_position_embeddings
        if not 2 <= max_length <= limit:
            raise ValueError(f"HunyuanCLIP max_length = {max_length}: valid 2..{limit} (the BertModel's "
                             "max_position_embeddings)")
        self.model = model.eval().requires_grad_(False)
        self.max_length, self.zero_padding = max_length, zero_padding


# --------------------------------------------------------------------------------------------
# The factory (``FamilySpec.text_encoders``) and the data loader's tokenizers
# --------------------------------------------------------------------------------------------

# text_encoder.model_id -> (encoder class, default dtype); MindSpeed-MM's Step-Video JSON names
TEXT_ENCODERS: dict[str, tuple[type, str]] = {"StepLLmModel": (StepLLMEncoder, "bf16"),
                                              "BertModel": (HunyuanCLIPEncoder, "fp32")}
COMPONENT_PARAMS = {"hub_backend": ("hf",)}  # further keys a text_encoder entry may hold -> valid values


def stepvideo_text_encoder(component, max_length: int, zero_padding: bool) -> nn.Module:
    """The encoder of one ``text_encoder`` entry (``model_id``, ``from_pretrained``, ``dtype``, and
    optionally ``hub_backend: "hf"``), tokenizing to ``max_length``."""
    model_id = component.model_id
    if model_id not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder.model_id = {model_id!r}; valid for Step-Video: StepLLmModel (Step-LLM), "
                         "BertModel (HunyuanCLIP)")
    for name, value in (getattr(component, "params", None) or {}).items():
        if name not in COMPONENT_PARAMS:
            raise ValueError(f"text_encoder.{name}: unknown key for model_id {model_id!r}; valid keys: model_id, "
                             f"from_pretrained, dtype, {', '.join(COMPONENT_PARAMS)}")
        if value not in COMPONENT_PARAMS[name]:
            raise ValueError(f"text_encoder.{name} = {value!r}; valid: {', '.join(map(repr, COMPONENT_PARAMS[name]))}")
    cls, default_dtype = TEXT_ENCODERS[model_id]
    return cls(component.from_pretrained, component.dtype or default_dtype, max_length=max_length,
               zero_padding=zero_padding)


TOKENIZERS = ("stepchat", "BertTokenizer")  # tokenizer_config.autotokenizer_name values


def stepvideo_tokenizer(config: dict[str, Any]):
    """The tokenizer of one data JSON ``tokenizer_config`` entry (``autotokenizer_name`` ``"stepchat"``
    or ``"BertTokenizer"``, ``from_pretrained``), called as a transformers tokenizer is
    (``tok(text, padding="max_length", max_length=..., truncation=True, return_tensors="pt")``)."""
    name = config.get("autotokenizer_name")
    path = config.get("from_pretrained")
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer_config.autotokenizer_name = {name!r}; valid for Step-Video: "
                         f"{', '.join(TOKENIZERS)}")
    if not path:
        raise ValueError("tokenizer_config.from_pretrained is required")
    if name == "stepchat":
        return StepLLMTokenizer(path)
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(path))
