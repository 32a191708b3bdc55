"""Step-Video's text encoders (Step-LLM with its sqrt-ALiBi attention, HunyuanCLIP), against
formulas written here, transformers' BertModel / BertTokenizer, sentencepiece, and (when
``MM_MINDSPEED_MM_REF`` names a MindSpeed-MM checkout) MindSpeed-MM's own pure-torch Step-LLM."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm.families.stepvideo.text_encoder_tiny import (TINY_SENTENCES, have_sentencepiece, save_tiny_hunyuan_clip,
                                                     save_tiny_step_llm, save_tiny_step_llm_tokenizer,
                                                     tiny_step_llm_state)
from mm.families.stepvideo.text_encoders import (HunyuanCLIPEncoder, StepLLM, StepLLMConfig, StepLLMEncoder,
                                                 StepLLMTokenizer, alibi_slopes, load_step_llm,
                                                 sqrt_alibi_bias, stepvideo_text_encoder, stepvideo_tokenizer)

REF_ENV = "MM_MINDSPEED_MM_REF"
LONG_PROMPT = " ".join(TINY_SENTENCES * 20)  # far more than 318 tokens with either tiny tokenizer


def expected_slopes(heads: int) -> list[float]:
    """ALiBi slopes by the closed form: n = the largest power of two <= heads; 2^(-8k/n), k = 1..n,
    then 2^(-8k/(2n)) for odd k for the heads past n."""
    n = 1
    while n * 2 <= heads:
        n *= 2
    first = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    rest = [2.0 ** (-8.0 * k / (2 * n)) for k in range(1, 2 * heads, 2)][:heads - n]
    return first + rest


@pytest.mark.parametrize("heads", [8, 12, 48])
def test_alibi_slopes_closed_form(heads):
    got = alibi_slopes(heads)
    assert got.dtype == torch.float32 and got.shape == (heads,)
    torch.testing.assert_close(got.double(), torch.tensor(expected_slopes(heads), dtype=torch.float64), rtol=1e-7,
                               atol=0)
    if heads == 8:
        assert got.tolist() == [2.0 ** -k for k in range(1, 9)]
    if heads == 12:  # 8 heads at 2^-1 .. 2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
        torch.testing.assert_close(got[8:].double(), torch.tensor([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5],
                                                                  dtype=torch.float64), rtol=1e-7, atol=0)


def test_sqrt_alibi_bias_is_causal_and_sqrt_of_distance():
    heads, seq = 3, 6
    bias = sqrt_alibi_bias(heads, seq)
    slopes = expected_slopes(heads)
    for h in range(heads):
        for i in range(seq):
            for j in range(seq):
                if j > i:
                    assert bias[h, i, j] == float("-inf")
                else:
                    assert math.isclose(bias[h, i, j].item(), -math.sqrt(i - j) * slopes[h], rel_tol=1e-6, abs_tol=1e-7)


# ----------------------------------------------------------------------------------------------
# Step-LLM against a naive float64 implementation of the formulas
# ----------------------------------------------------------------------------------------------

def naive_step_llm(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Embedding; per layer x += wo(attn(rms(x))), x += w2(silu(gate) * up) of w1(rms(x)); no final norm.
    Attention per batch row, head and query with explicit loops, in float64."""
    sd = {k: v.double() for k, v in state.items()}
    d, heads, groups, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_attention_groups"], \
        cfg["layernorm_epsilon"]
    hd = d // heads
    ffn = 256 * -(-cfg["ffn_hidden_size"] // 256)
    slopes = expected_slopes(heads)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    x = sd["tok_embeddings.word_embeddings.weight"][ids]
    b, s, _ = x.shape
    for layer in range(cfg["num_layers"]):
        p = f"transformer.layers.{layer}."
        qkv = torch.einsum("bsd,ed->bse", rms(x, sd[p + "attention_norm.weight"]), sd[p + "attention.wqkv.weight"])
        q = qkv[..., :d].reshape(b, s, heads, hd)
        kv = qkv[..., d:].reshape(b, s, groups, 2, hd)  # per group [k | v]
        attn = torch.zeros(b, s, heads, hd, dtype=torch.float64)
        for bi in range(b):
            for h in range(heads):
                g = h // (heads // groups)
                for i in range(s):
                    scores = torch.stack([q[bi, i, h] @ kv[bi, j, g, 0] / math.sqrt(hd) - math.sqrt(i - j) * slopes[h]
                                          for j in range(i + 1)])
                    weights = torch.softmax(scores, 0)
                    attn[bi, i, h] = sum(weights[j] * kv[bi, j, g, 1] for j in range(i + 1))
        x = x + torch.einsum("bse,de->bsd", attn.reshape(b, s, d), sd[p + "attention.wo.weight"])
        up = torch.einsum("bsd,ed->bse", rms(x, sd[p + "ffn_norm.weight"]), sd[p + "feed_forward.w1.weight"])
        gate, lin = up[..., :ffn], up[..., ffn:]
        x = x + torch.einsum("bsf,df->bsd", gate * torch.sigmoid(gate) * lin, sd[p + "feed_forward.w2.weight"])
    return x


def tiny_cfg(heads=6, groups=2, hidden=24, layers=2, ffn=40, vocab=32):
    return dict(hidden_size=hidden, num_attention_heads=heads, num_attention_groups=groups, num_layers=layers,
                ffn_hidden_size=ffn, padded_vocab_size=vocab, layernorm_epsilon=1e-5)


def padded_ids(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    ids[0, 0] = ids[1, 0] = 1
    ids[0, 4], ids[0, 5:] = 2, 2  # row 0: BOS, 3 tokens, EOS, padding
    ids[1, 6] = 2
    mask = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])
    return ids, mask


@pytest.mark.parametrize("heads,groups", [(6, 2), (4, 4), (4, 1)])
def test_step_llm_matches_naive_float64(heads, groups):
    cfg = tiny_cfg(heads, groups)
    config = StepLLMConfig(**cfg)
    state = tiny_step_llm_state(config, seed=heads + groups)
    model = StepLLM(config, dtype=torch.float64)
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    ids, mask = padded_ids(cfg["padded_vocab_size"])
    with torch.no_grad():
        out = model(ids, mask)
    ref = naive_step_llm(state, cfg, ids)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_step_llm_fp32_residual_keeps_the_stream_in_fp32():
    config = StepLLMConfig(**tiny_cfg(), fp32_residual_connection=True)
    model = StepLLM(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.bfloat16() for k, v in tiny_step_llm_state(config).items()})
    ids, _ = padded_ids(32)
    with torch.no_grad():
        out = model(ids)
    assert out.dtype == torch.float32
    ref = naive_step_llm({k: v.bfloat16() for k, v in tiny_step_llm_state(config).items()}, tiny_cfg(), ids)
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 layers, same function


# ----------------------------------------------------------------------------------------------
# Step-LLM against MindSpeed-MM's pure-torch implementation
# ----------------------------------------------------------------------------------------------

class _RefRMSNorm(torch.nn.Module):
    """Step-Video's RMSNorm (stepvideo/modules/normalization.py): fp32 normalisation, cast back, times
    the weight. Stands in for MindSpeed's NPU-fused RMSNorm behind ``normalize(norm_type="rmsnorm")``."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _mindspeed_module(monkeypatch):
    root = os.environ.get(REF_ENV)
    if not root:
        pytest.skip(f"set {REF_ENV} to a MindSpeed-MM checkout (57069cd5) to compare with its stepllm_text_encoder.py")
    path = Path(root) / "mindspeed_mm" / "models" / "text_encoder" / "stepllm_text_encoder.py"
    if not path.is_file():
        pytest.fail(f"{REF_ENV} = {root!r}: no {path.relative_to(root)} there")
    import transformers.modeling_utils  # noqa: F401  (loaded before the stand-ins below exist)

    normalize = types.ModuleType("mindspeed_mm.models.common.normalize")
    normalize.normalize = lambda dim, eps=1e-6, norm_type=None, **kw: _RefRMSNorm(dim, eps)
    with monkeypatch.context() as m:  # stand-ins only while the file is imported
        for name in ("mindspeed_mm", "mindspeed_mm.models", "mindspeed_mm.models.common", "torch_npu"):
            m.setitem(sys.modules, name, types.ModuleType(name))
        m.setitem(sys.modules, "mindspeed_mm.models.common.normalize", normalize)
        spec = importlib.util.spec_from_file_location("mindspeed_stepllm_reference", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("heads,groups", [(6, 2), (8, 8)])
def test_step_llm_matches_mindspeed_reference(monkeypatch, heads, groups):
    ref_module = _mindspeed_module(monkeypatch)
    from transformers import PretrainedConfig

    cfg = tiny_cfg(heads, groups, hidden=48)
    config = StepLLMConfig(**cfg)
    state = tiny_step_llm_state(config, seed=3)
    ref_config = PretrainedConfig(**cfg, seq_length=320, use_flash_attn=True, attention_dropout=0.0,
                                  hidden_dropout=0.0)
    ref = ref_module.StepLLmModel(ref_config).eval()
    ref.load_state_dict(state, strict=True)
    torch.testing.assert_close(ref_module._get_alibi_slopes(heads), alibi_slopes(heads), rtol=1e-6, atol=0)
    ours = StepLLM(config, dtype=torch.float32)
    ours.load_state_dict(state, strict=True)
    ids, mask = padded_ids(cfg["padded_vocab_size"])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        got = ours(ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Loading the release layout
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return save_tiny_step_llm(tmp_path_factory.mktemp("stepllm") / "step_llm")


def _release_state(path: Path) -> dict:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_load_sharded_and_single_file_in_bf16(tiny_llm, tmp_path):
    single = save_tiny_step_llm(tmp_path / "single", shards=1)
    state = _release_state(tiny_llm)
    for path in (tiny_llm, single):
        model = load_step_llm(path, "bf16")
        params = dict(model.named_parameters())
        assert set(params) == set(state)
        assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and not p.requires_grad
                   for p in params.values())
        for name, tensor in state.items():
            assert torch.equal(params[name], tensor.bfloat16()), name
    config = json.loads((tiny_llm / "config.json").read_text())
    assert len(state) == 1 + 6 * config["num_layers"]


def _copy_release(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_loader_errors_name_the_key_or_file(tiny_llm, tmp_path):
    index = json.loads((tiny_llm / "model.safetensors.index.json").read_text())["weight_map"]
    victim = "transformer.layers.1.feed_forward.w2.weight"

    bad = _copy_release(tiny_llm, tmp_path / "missing_key")
    shard = bad / index[victim]
    part = load_file(str(shard))
    del part[victim]
    save_file(part, str(shard))
    weight_map = {k: v for k, v in index.items() if k != victim}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"missing: {victim}"):
        load_step_llm(bad)

    bad = _copy_release(tiny_llm, tmp_path / "unexpected_key")
    shard = bad / index[victim]
    part = load_file(str(shard))
    part["transformer.layers.0.attention.lm_head.weight"] = torch.zeros(2)
    save_file(part, str(shard))
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**index, "transformer.layers.0.attention.lm_head.weight": index[victim]}}))
    with pytest.raises(ValueError, match=r"unexpected: transformer\.layers\.0\.attention\.lm_head\.weight"):
        load_step_llm(bad)

    bad = _copy_release(tiny_llm, tmp_path / "missing_file")
    (bad / index[victim]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"names file\(s\) not in .*: {index[victim]}"):
        load_step_llm(bad)

    bad = _copy_release(tiny_llm, tmp_path / "key_not_in_file")
    other = next(f for f in set(index.values()) if f != index[victim])
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**index, victim: other}}))
    with pytest.raises(ValueError, match=rf"{other}: the index places {victim} in this file"):
        load_step_llm(bad)

    bad = _copy_release(tiny_llm, tmp_path / "no_weights")
    for f in [*bad.glob("*.safetensors"), bad / "model.safetensors.index.json"]:
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        load_step_llm(bad)

    bad = _copy_release(tiny_llm, tmp_path / "shape")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "ffn_hidden_size": 300}))  # FFN width 512 vs 256
    with pytest.raises(ValueError, match=r"feed_forward\.w[12]\.weight has shape \((512, 48|48, 256)\); the config gives \((1024, 48|48, 512)\)"):
        load_step_llm(bad)

    bad = _copy_release(tiny_llm, tmp_path / "config_key")
    (bad / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_attention_groups"}))
    with pytest.raises(ValueError, match=r"config\.json: missing key\(s\) num_attention_groups"):
        load_step_llm(bad)
    (bad / "config.json").write_text(json.dumps({**config, "num_attention_groups": 4}))
    with pytest.raises(ValueError, match=r"num_attention_heads = 6 is not a multiple of num_attention_groups = 4"):
        load_step_llm(bad)

    with pytest.raises(FileNotFoundError, match=r"text_encoder\.from_pretrained = .*no config\.json"):
        load_step_llm(tmp_path)


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------

def _raw_ids(tok_file: Path, text: str) -> list[int]:
    """Ids of ``text`` straight from the library that owns the file."""
    if tok_file.suffix == ".model":
        import sentencepiece

        return list(sentencepiece.SentencePieceProcessor(model_file=str(tok_file)).encode_as_ids(text))
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_file)).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", ["sentencepiece", "json"])
def test_step_llm_tokens_bos_eos_padding_truncation(tmp_path, kind):
    if kind == "sentencepiece" and not have_sentencepiece():
        pytest.skip("the sentencepiece package is not installed")
    tok_file = save_tiny_step_llm_tokenizer(tmp_path, kind=kind)
    tok = StepLLMTokenizer(tok_file)
    short, empty = "a cat runs over the red ball", ""
    ids, mask = tok.tokenize([short, LONG_PROMPT, empty], 320)
    assert ids.shape == mask.shape == (3, 320) and ids.dtype == mask.dtype == torch.long
    raw = _raw_ids(tok_file, short)
    assert 0 < len(raw) < 318
    assert ids[0].tolist() == [1, *raw, 2] + [2] * (318 - len(raw))
    assert mask[0].tolist() == [1] * (len(raw) + 2) + [0] * (318 - len(raw))
    long_raw = _raw_ids(tok_file, LONG_PROMPT)
    assert len(long_raw) > 318
    assert ids[1].tolist() == [1, *long_raw[:318], 2] and mask[1].sum() == 320
    assert ids[2].tolist() == [1, 2] + [2] * 318 and mask[2].tolist() == [1, 1] + [0] * 318
    # the directory (the encoder's from_pretrained) and the file give the same; so does the
    # transformers-style call the data loader makes
    assert torch.equal(StepLLMTokenizer(tmp_path).tokenize([short])[0], ids[:1])
    call = tok(short, padding="max_length", max_length=320, truncation=True, return_tensors="pt")
    assert torch.equal(call.input_ids, ids[:1]) and torch.equal(call.attention_mask, mask[:1])


def test_step_llm_tokenizer_without_sentencepiece_says_what_is_missing(tmp_path, monkeypatch):
    if not have_sentencepiece():
        (tmp_path / "step1_chat_tokenizer.model").write_bytes(b"not read")
    else:
        save_tiny_step_llm_tokenizer(tmp_path, kind="sentencepiece")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
    with pytest.raises(ImportError, match=r"step1_chat_tokenizer\.model needs the sentencepiece package "
                                          r"\(sentencepiece==0\.2\.3.*tokenizer\.json"):
        StepLLMTokenizer(tmp_path / "step1_chat_tokenizer.model")
    save_tiny_step_llm_tokenizer(tmp_path, kind="json")  # the fallback beside it
    assert StepLLMTokenizer(tmp_path / "step1_chat_tokenizer.model").source.name == "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=r"no step1_chat_tokenizer\.model"):
        StepLLMTokenizer(tmp_path / "elsewhere" / "step1_chat_tokenizer.model")


def test_step_llm_encoder_tokenizes_to_320_and_padding_does_not_reach_the_prompt(tiny_llm):
    enc = StepLLMEncoder(tiny_llm, "fp32")
    assert enc.max_length == 320
    ids, mask = enc.tokenize(["a cat runs", "the blue dog jumps under the sky"])
    out = enc.encode(ids, mask)
    assert out.shape == (2, 320, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, enc.model(ids))
    other = ids.clone()
    other[mask == 0] = 5  # other tokens in the padding
    changed = enc.encode(other, mask)
    keep = mask.bool()
    torch.testing.assert_close(changed[keep], out[keep], rtol=0, atol=0)
    zeroed = StepLLMEncoder(tiny_llm, "bf16", max_length=320, zero_padding=True)
    z = zeroed.encode(ids, mask)
    assert z.dtype == torch.bfloat16 and torch.count_nonzero(z[~keep]) == 0 and torch.count_nonzero(z[keep]) > 0


# ----------------------------------------------------------------------------------------------
# HunyuanCLIP
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_hunyuan_clip(tmp_path_factory.mktemp("clip") / "hunyuan_clip")


def test_hunyuan_clip_77_tokens_and_bert_hidden_states(tiny_clip):
    from transformers import BertModel, BertTokenizer

    bert_tok = BertTokenizer.from_pretrained(str(tiny_clip / "tokenizer"))
    for path in (tiny_clip / "clip_text_encoder", tiny_clip):  # MindSpeed's from_pretrained, or the release folder
        enc = HunyuanCLIPEncoder(path)
        assert enc.max_length == 77
        ids, mask = enc.tokenize(["a cat runs", LONG_PROMPT])
        assert ids.shape == mask.shape == (2, 77)
        words = [bert_tok.convert_tokens_to_ids(w) for w in ("a", "cat", "runs")]
        cls, sep, pad = (bert_tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        assert ids[0].tolist() == [cls, *words, sep] + [pad] * 72 and mask[0].tolist() == [1] * 5 + [0] * 72
        assert ids[1, 0] == cls and ids[1, 76] == sep and mask[1].sum() == 77
        out = enc.encode(ids, mask)
        assert out.shape == (2, 77, 16) and out.dtype == torch.float32
        ref = BertModel.from_pretrained(str(tiny_clip / "clip_text_encoder")).eval()
        with torch.no_grad():
            expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out, expected)
        assert not any(p.requires_grad for p in enc.parameters())


def test_hunyuan_clip_errors(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text_encoder\.from_pretrained = .*no config\.json there nor in "
                                                r"clip_text_encoder/"):
        HunyuanCLIPEncoder(tmp_path)
    with pytest.raises(ValueError, match=r"HunyuanCLIP max_length = 200: valid 2\.\.128"):
        HunyuanCLIPEncoder(tiny_clip, max_length=200)
    bad = tmp_path / "hc"
    (bad / "clip_text_encoder").mkdir(parents=True)
    (bad / "tokenizer").mkdir()
    (bad / "tokenizer" / "vocab.txt").write_bytes((tiny_clip / "tokenizer" / "vocab.txt").read_bytes())
    (bad / "clip_text_encoder" / "config.json").write_bytes((tiny_clip / "clip_text_encoder" / "config.json").read_bytes())
    state = load_file(str(tiny_clip / "clip_text_encoder" / "model.safetensors"))
    state.pop("encoder.layer.1.output.dense.weight")
    save_file(state, str(bad / "clip_text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"BertModel weights missing: encoder\.layer\.1\.output\.dense\.weight"):
        HunyuanCLIPEncoder(bad)


# ----------------------------------------------------------------------------------------------
# The factory and the data loader's tokenizers, with MindSpeed-MM's Step-Video JSON entries
# ----------------------------------------------------------------------------------------------

def test_factory_picks_by_model_id(tiny_llm, tiny_clip):
    llm = stepvideo_text_encoder(SimpleNamespace(model_id="StepLLmModel", from_pretrained=str(tiny_llm), dtype=None,
                                                 params={"hub_backend": "hf"}), 320, False)
    assert isinstance(llm, StepLLMEncoder) and llm.max_length == 320
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}  # bf16 unless the entry says otherwise
    clip = stepvideo_text_encoder(SimpleNamespace(model_id="BertModel", dtype=None, params={},
                                                  from_pretrained=str(tiny_clip / "clip_text_encoder")), 77, False)
    assert isinstance(clip, HunyuanCLIPEncoder) and {p.dtype for p in clip.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match=r"text_encoder\.model_id = 'StepLLM'; valid for Step-Video: StepLLmModel "
                                         r"\(Step-LLM\), BertModel \(HunyuanCLIP\)"):
        stepvideo_text_encoder(SimpleNamespace(model_id="StepLLM", from_pretrained=str(tiny_llm), dtype=None,
                                               params={}), 320, False)
    with pytest.raises(ValueError, match=r"text_encoder\.use_attention_mask: unknown key .*valid keys: model_id, "
                                         r"from_pretrained, dtype, hub_backend"):
        stepvideo_text_encoder(SimpleNamespace(model_id="StepLLmModel", from_pretrained=str(tiny_llm), dtype=None,
                                               params={"use_attention_mask": True}), 320, False)
    with pytest.raises(ValueError, match=r"text_encoder\.dtype = 'int8'; valid: fp32"):
        stepvideo_text_encoder(SimpleNamespace(model_id="StepLLmModel", from_pretrained=str(tiny_llm), dtype="int8",
                                               params={}), 320, False)


def test_data_tokenizers_from_tokenizer_config(tiny_llm, tiny_clip):
    tok_file = next(tiny_llm.glob("step1_chat_tokenizer.model"), tiny_llm / "tokenizer.json")
    step = stepvideo_tokenizer({"autotokenizer_name": "stepchat", "hub_backend": "hf",
                                "from_pretrained": str(tok_file), "model_max_length": 320})
    bert = stepvideo_tokenizer({"autotokenizer_name": "BertTokenizer", "hub_backend": "hf",
                                "from_pretrained": str(tiny_clip / "tokenizer"), "model_max_length": 77})
    caption = "the dog and the cat play in the snow"
    for tok, enc in ((step, StepLLMEncoder(tiny_llm, "fp32")), (bert, HunyuanCLIPEncoder(tiny_clip))):
        out = tok(caption, padding="max_length", max_length=enc.max_length, truncation=True, return_tensors="pt")
        ids, mask = enc.tokenize([caption])
        assert torch.equal(out.input_ids, ids) and torch.equal(out.attention_mask, mask)
    with pytest.raises(ValueError, match=r"tokenizer_config\.autotokenizer_name = 'AutoTokenizer'; valid for "
                                         r"Step-Video: stepchat, BertTokenizer"):
        stepvideo_tokenizer({"autotokenizer_name": "AutoTokenizer", "from_pretrained": "x"})
