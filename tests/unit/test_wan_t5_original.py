"""Wan's own text encoder release (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl``) against the golden
outputs of Wan's ``T5Encoder`` (``tests/fixtures/wan_original/make_t5_fixtures.py``), the tokenizer's place,
``mm-convert WanConverter t5_convert`` and Wan's prompt cleaning."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm.models.text_encoder import TextEncoder
from mm.models.text_encoder.wan_t5 import load_wan_t5, umt5_config_from_original, umt5_state_to_original
from tests.encoder_helpers import save_tokenizer

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "wan_original"
RELEASE_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
REF_ENV = "MM_WAN_REF"
GOLDEN = json.loads((FIXTURES / "t5_golden.json").read_text())
IO = load_file(str(FIXTURES / "t5_io.safetensors"))


def _assert_golden(hidden: torch.Tensor) -> None:
    """``hidden`` [2, 16, 32] equals the reference's output at every unmasked position (atol 1e-4)."""
    for row, length in enumerate(GOLDEN["lengths"]):
        assert int(IO["attention_mask"][row].sum()) == length
        torch.testing.assert_close(hidden[row, :length].float(), IO["output"][row, :length], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tokenizer_source(tmp_path_factory) -> Path:
    """A word-level tokenizer directory (it also holds a throwaway 16-wide encoder's config.json and weights)."""
    path = tmp_path_factory.mktemp("tokenizer") / "tok"
    save_tokenizer(path)
    return path


@pytest.fixture
def release(tmp_path, tokenizer_source) -> Path:
    """Wan's checkpoint directory layout: the .pth with google/umt5-xxl beside it."""
    root = tmp_path / "Wan2.1-T2V-1.3B"
    root.mkdir()
    shutil.copyfile(FIXTURES / "t5_encoder.pth", root / RELEASE_NAME)
    shutil.copytree(tokenizer_source, root / "google" / "umt5-xxl")
    return root / RELEASE_NAME


def test_loader_reproduces_wan_t5_encoder():
    state = torch.load(FIXTURES / "t5_encoder.pth", map_location="cpu", weights_only=True)
    config = umt5_config_from_original(state)
    ref = GOLDEN["config"]
    assert (config.vocab_size, config.d_model, config.d_kv * config.num_heads, config.d_ff, config.num_heads,
            config.num_layers, config.relative_attention_num_buckets) == (
        ref["vocab"], ref["dim"], ref["dim_attn"], ref["dim_ffn"], ref["num_heads"], ref["num_layers"],
        ref["num_buckets"])
    model = load_wan_t5(FIXTURES / "t5_encoder.pth", torch.float32)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    _assert_golden(model(input_ids=IO["input_ids"], attention_mask=IO["attention_mask"]).last_hidden_state)
    assert load_wan_t5(FIXTURES / "t5_encoder.pth", torch.bfloat16).dtype == torch.bfloat16


def test_inverse_round_trips_the_keys():
    state = torch.load(FIXTURES / "t5_encoder.pth", map_location="cpu", weights_only=True)
    back = umt5_state_to_original(load_wan_t5(FIXTURES / "t5_encoder.pth").state_dict())
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_inverse_of_a_transformers_model_loads_to_the_same_function(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.UMT5Config(vocab_size=64, d_model=24, d_kv=4, d_ff=40, num_layers=3, num_heads=3,
                                     relative_attention_num_buckets=16)
    model = transformers.UMT5EncoderModel(config).eval()
    torch.save(umt5_state_to_original(model.state_dict()), tmp_path / RELEASE_NAME)
    loaded = load_wan_t5(tmp_path / RELEASE_NAME)
    ids, mask = torch.randint(2, 64, (2, 10)), torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                               model(input_ids=ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(ValueError, match="no Wan T5Encoder name for lm_head.weight"):
        umt5_state_to_original({**model.state_dict(), "lm_head.weight": torch.zeros(1)})
    untied = dict(model.state_dict(), **{"encoder.embed_tokens.weight": torch.zeros(64, 24)})
    with pytest.raises(ValueError, match="differ"):
        umt5_state_to_original(untied)


@dataclass
class PickledThing:  # a class no weights-only load may rebuild (SimpleNamespace may be allow-listed elsewhere)
    a: int


def test_bad_files_are_refused_naming_them(tmp_path):
    data = (FIXTURES / "t5_encoder.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"from_pretrained = '{truncated}' is not a readable torch")):
        load_wan_t5(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=re.escape(f"from_pretrained = '{text}' is not a readable torch")):
        load_wan_t5(text)
    pickled = tmp_path / "object.pth"
    torch.save({"weights": PickledThing(1)}, pickled)
    with pytest.raises(ValueError, match=re.escape(f"'{pickled}' holds more than tensors")):
        load_wan_t5(pickled)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match=re.escape(f"'{listed}' holds a list, not a state dict")):
        load_wan_t5(listed)

    state = torch.load(FIXTURES / "t5_encoder.pth", map_location="cpu", weights_only=True)
    broken = dict(state)
    del broken["blocks.1.attn.k.weight"], broken["norm.weight"]
    broken["pos_embedding.embedding.weight"] = torch.zeros(32, 4)  # a shared position bias: T5, not UMT5
    broken["blocks.1.ffn.fc2.weight"] = torch.zeros(32, 63)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as error:
        load_wan_t5(tmp_path / "broken.pth")
    message = str(error.value)
    assert f"text_encoder.from_pretrained = '{tmp_path / 'broken.pth'}'" in message
    assert "missing (2): blocks.1.attn.k.weight, norm.weight" in message
    assert "unexpected (1): pos_embedding.embedding.weight" in message
    assert "misshapen (1): blocks.1.ffn.fc2.weight [32, 63], expected [32, 64]" in message
    del state["blocks.0.pos_embedding.embedding.weight"]
    torch.save(state, tmp_path / "shared_pos.pth")
    with pytest.raises(ValueError, match="missing blocks.0.pos_embedding.embedding.weight"):
        load_wan_t5(tmp_path / "shared_pos.pth")


def test_text_encoder_reads_the_release_file_with_its_tokenizer_beside_it(release):
    enc = TextEncoder("umt5", str(release), dtype="fp32", max_length=16)
    hidden = enc.encode(IO["input_ids"], IO["attention_mask"])
    _assert_golden(hidden)
    assert torch.count_nonzero(hidden[0, GOLDEN["lengths"][0]:]) == 0  # Wan's padded part is exactly zero
    ids, mask = enc.tokenize(["a red cat runs"])
    assert ids.shape == (1, 16) and mask[0].tolist() == [1] * 5 + [0] * 11
    with pytest.raises(ValueError, match="is a file, read as Wan's release file .* text_encoder.model_id = 'mt5'"):
        TextEncoder("mt5", str(release), dtype="fp32")


def test_tokenizer_key_overrides_and_a_missing_tokenizer_names_both_paths(release, tmp_path):
    moved = tmp_path / "elsewhere" / "umt5-tokenizer"
    shutil.move(release.parent / "google" / "umt5-xxl", moved)
    default = release.parent / "google" / "umt5-xxl"
    with pytest.raises(FileNotFoundError) as error:
        TextEncoder("umt5", str(release), dtype="fp32")
    assert "text_encoder.tokenizer is not set" in str(error.value)
    assert f"'{default}'" in str(error.value) and f"text_encoder.from_pretrained = '{release}'" in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        TextEncoder("umt5", str(release), dtype="fp32", tokenizer=str(tmp_path / "nowhere"))
    assert f"text_encoder.tokenizer = '{tmp_path / 'nowhere'}'" in str(error.value)
    assert f"'{default}'" in str(error.value)

    from mm.arguments.json_configs import parse_model_config
    from mm.families import families

    problems: list[str] = []
    section = {"model_id": "umt5", "from_pretrained": str(release), "dtype": "fp32", "tokenizer": str(moved)}
    config = parse_model_config({"predictor": {"model_id": "wan_dit"}, "text_encoder": section}, "model.json", problems)
    assert problems == [] and config.text_encoder[0].params == {"tokenizer": str(moved)}
    for spec in families():
        if spec.name in ("wan", "opensoraplan"):  # the default factory's families
            enc = spec.text_encoders(config.text_encoder[0], 16, True)
            _assert_golden(enc.encode(IO["input_ids"], IO["attention_mask"]))
            assert enc.tokenize(["a red cat"])[0][0, :4].tolist() == [3, 10, 4, 1]  # WORDS' ids, </s>


def test_prompt_cleaning_as_wan_written_out():
    from mm.models.text_encoder.prompt_clean import clean_prompt

    assert clean_prompt("一只猫，在草地上奔跑！") == "一只猫,在草地上奔跑!"  # full-width punctuation
    assert clean_prompt("（镜头）：慢慢地") == "(镜头):慢慢地"
    assert clean_prompt("Tom &amp;amp; Jerry") == "Tom & Jerry"  # unescaped twice
    assert clean_prompt("  a   cat\t\nruns  ") == "a cat runs"
    assert clean_prompt("\u3000a cat\u3000") == "a cat"  # an ideographic space


PROMPTS = ["一只猫，在草地上奔跑！", "Tom &amp;amp; Jerry", "  a   cat\t\nruns  ", "\u3000a cat\u3000", "cafÃ©",
           "x\x1cy\u2028z", "&lt;b&gt;bold&lt;/b&gt; &amp;lt;", "A\u00a0B\u2003C", "",
           "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留"]


def test_prompt_cleaning_equals_wan_tokenizers_py():
    reference = os.environ.get(REF_ENV)
    if not reference:
        pytest.skip(f"{REF_ENV} is not set (a Wan2.1 checkout at 9737cba: its wan/modules/tokenizers.py)")
    from mm.models.text_encoder.prompt_clean import clean_prompt

    spec = importlib.util.spec_from_file_location("wan_tokenizers", Path(reference) / "wan/modules/tokenizers.py")
    wan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wan)
    for prompt in PROMPTS:
        assert clean_prompt(prompt) == wan.whitespace_clean(wan.basic_clean(prompt)), prompt


def test_wan_family_cleans_prompts_and_the_others_do_not(tmp_path, tokenizer_source):
    from mm.arguments.json_configs import ComponentConfig
    from mm.families import families
    from mm.models.text_encoder.prompt_clean import clean_prompt

    section = ComponentConfig(model_id="umt5", from_pretrained=str(tokenizer_source), dtype="fp32")
    built = {spec.name: spec.text_encoders(section, 12, True) for spec in families()
             if spec.name in ("wan", "opensoraplan")}
    assert built["wan"].clean is clean_prompt and built["opensoraplan"].clean is None
    raw = "a&amp;amp;cat  runs"
    assert torch.equal(built["wan"].tokenize([raw])[0], built["opensoraplan"].tokenize(["a&cat runs"])[0])
    assert not torch.equal(built["wan"].tokenize([raw])[0], built["opensoraplan"].tokenize([raw])[0])


def _mm_convert(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "checkpoint", "WanConverter", "--version", "wan2.1", *args], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)


def test_t5_convert_command_writes_a_directory_text_encoder_reads(release, tmp_path):
    done = _mm_convert("t5_convert", "--cfg.source_path", str(release), "--cfg.target_path", "umt5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "t5_convert:" in done.stdout
    out = tmp_path / "umt5"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["UMT5EncoderModel"] and config["d_model"] == 32  # not the tokenizer dir's
    tokenizer = release.parent / "google" / "umt5-xxl"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tokenizer / name).read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask for f in out.glob("*.safetensors"))
    enc = TextEncoder("umt5", str(out), dtype="fp32", max_length=16)
    _assert_golden(enc.encode(IO["input_ids"], IO["attention_mask"]))
    direct = TextEncoder("umt5", str(release), dtype="fp32", max_length=16)
    assert torch.equal(enc.tokenize(["a red cat runs"])[0], direct.tokenize(["a red cat runs"])[0])


def test_t5_convert_tokenizer_option_and_errors(release, tmp_path):
    from checkpoint.config import ConvertConfig, ConvertError, SourceDataError
    from mm.families.wan.convert import WanConverter

    converter = WanConverter("wan2.1")
    moved = tmp_path / "tokenizer"
    shutil.move(release.parent / "google" / "umt5-xxl", moved)
    with pytest.raises(ConvertError, match="--tokenizer_path is not set .* beside --cfg.source_path"):
        converter.t5_convert(ConvertConfig(str(release), str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    converter.t5_convert(ConvertConfig(str(release), str(tmp_path / "out")), tokenizer_path=str(moved))
    _assert_golden(TextEncoder("umt5", str(tmp_path / "out"), "fp32", 16).encode(IO["input_ids"],
                                                                                   IO["attention_mask"]))
    with pytest.raises(ConvertError, match="exists; pass --cfg.overwrite true"):
        converter.t5_convert(ConvertConfig(str(release), str(tmp_path / "out")), tokenizer_path=str(moved))
    data = release.read_bytes()
    release.write_bytes(data[: len(data) // 3])
    with pytest.raises(SourceDataError, match="--cfg.source_path = .* is not a readable torch file"):
        converter.t5_convert(ConvertConfig(str(release), str(tmp_path / "out2")), tokenizer_path=str(moved))
    state = torch.load(FIXTURES / "t5_encoder.pth", map_location="cpu", weights_only=True)
    del state["blocks.0.ffn.gate.0.weight"]
    torch.save(state, release)
    with pytest.raises(ConvertError, match=r"--cfg.source_path = .*\n  missing \(1\): blocks.0.ffn.gate.0.weight"):
        converter.t5_convert(ConvertConfig(str(release), str(tmp_path / "out2")), tokenizer_path=str(moved))
    torch.save({"token_embedding.weight": torch.zeros(4, 2), "step": 3}, release)
    with pytest.raises(ConvertError, match="step hold other values"):
        converter.t5_convert(ConvertConfig(str(release), str(tmp_path / "out2")), tokenizer_path=str(moved))
    assert not (tmp_path / "out2").exists()


def test_generator_reproduces_the_committed_fixtures(tmp_path):
    reference = os.environ.get(REF_ENV)
    if not reference:
        pytest.skip(f"{REF_ENV} is not set (a Wan2.1 checkout at 9737cba, run by make_t5_fixtures.py)")
    done = subprocess.run([sys.executable, str(FIXTURES / "make_t5_fixtures.py"), "--out", str(tmp_path)],
                          env=dict(os.environ, MM_WAN_REF=reference), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = torch.load(tmp_path / "t5_encoder.pth", map_location="cpu", weights_only=True)
    committed = torch.load(FIXTURES / "t5_encoder.pth", map_location="cpu", weights_only=True)
    assert sorted(fresh) == sorted(committed) and all(torch.equal(fresh[k], committed[k]) for k in committed)
    io = load_file(str(tmp_path / "t5_io.safetensors"))
    assert torch.equal(io["input_ids"], IO["input_ids"]) and torch.equal(io["attention_mask"], IO["attention_mask"])
    torch.testing.assert_close(io["output"], IO["output"], atol=1e-5, rtol=0)
    meta = json.loads((tmp_path / "t5_golden.json").read_text())
    assert {k: v for k, v in meta.items() if k != "torch"} == {k: v for k, v in GOLDEN.items() if k != "torch"}
