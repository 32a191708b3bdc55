"""Prompt extension (Wan's use_prompt_extend): the settings refused before any model loads, and a tiny random
Qwen2 causal LM (``tests/chat_lm_helpers.py``, made offline) rewriting prompts deterministically
per seed, without touching the global RNG, falling back to the original prompt where it fails."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from mm.arguments import ConfigError
from mm.inference import prompt_extend as pe
from mm.inference.prompt_extend import (
    Extended,
    LocalLMExtender,
    check_prompt_extend,
    extend_prompts,
    system_prompt,
)
from tests.chat_lm_helpers import make_tiny_chat_lm

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_chat_lm(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def extender(tiny_lm):
    ext = LocalLMExtender(tiny_lm, "cpu", torch.float32, max_new_tokens=NEW_TOKENS)
    yield ext
    ext.close()


# ---- the local model ---------------------------------------------------------------------------------------------

def test_same_seed_same_extension_and_the_global_rng_is_untouched(extender):
    before = torch.get_rng_state()
    first = extender.extend("a cat runs on the beach", "en", seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1234)  # another global state: the extension does not depend on it
    torch.rand(5)
    state = torch.get_rng_state()
    second = extender.extend("a cat runs on the beach", "en", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.ok and second.ok and first.message == ""
    assert first.extended and first.extended == second.extended
    assert first.prompt == "a cat runs on the beach"


def test_different_seeds_give_different_extensions(extender):
    texts = {extender.extend("a dog walks in golden light", "en", seed=s).extended for s in (0, 1, 2)}
    assert len(texts) == 3


def test_the_text_is_the_decoding_of_the_new_tokens_only(extender, monkeypatch):
    seen = {}
    original_generate = extender.model.generate
    original_template = extender.tokenizer.apply_chat_template

    def generate(**inputs):
        out = original_generate(**inputs)
        seen["input_ids"], seen["output"] = inputs["input_ids"], out
        return out

    def template(messages, **kwargs):
        seen["messages"], seen["template_kwargs"] = messages, kwargs
        return original_template(messages, **kwargs)

    monkeypatch.setattr(extender.model, "generate", generate)
    monkeypatch.setattr(extender.tokenizer, "apply_chat_template", template)
    result = extender.extend("the camera slowly pans over red waves", "zh", seed=3)
    n = seen["input_ids"].shape[1]
    assert torch.equal(seen["output"][0, :n], seen["input_ids"][0])  # the chat is the head of the output
    assert 0 < seen["output"].shape[1] - n <= NEW_TOKENS
    expected = extender.tokenizer.decode(seen["output"][0, n:], skip_special_tokens=True).strip()
    assert result.ok and result.extended == expected
    chat = extender.tokenizer.decode(seen["input_ids"][0], skip_special_tokens=True)
    assert "assistant" in chat and "assistant" not in result.extended
    assert seen["messages"] == [{"role": "system", "content": system_prompt("zh")},
                                {"role": "user", "content": "the camera slowly pans over red waves"}]
    assert seen["template_kwargs"] == {"tokenize": False, "add_generation_prompt": True}


def test_system_prompt_by_language():
    assert system_prompt("zh") == system_prompt("ch") != system_prompt("en")
    assert "中文" in system_prompt("ch") and "English" in system_prompt("en")
    for lang in ("zh", "en"):  # the rules: length target, motion and camera, output only the rewrite
        text = system_prompt(lang)
        assert "80" in text and "100" in text


def test_a_failing_model_falls_back_to_the_prompt_with_the_reason(extender, monkeypatch):
    def generate(**inputs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(extender.model, "generate", generate)
    before = torch.get_rng_state()
    result = extender.extend("a fox trots across the snow", "en", seed=0)
    assert result == Extended("a fox trots across the snow", "a fox trots across the snow", False, result.message)
    assert "RuntimeError: out of memory" in result.message and "original prompt" in result.message
    assert torch.equal(torch.get_rng_state(), before)


def test_an_empty_rewrite_falls_back(extender, monkeypatch):
    monkeypatch.setattr(extender, "rewrite", lambda prompt, lang, seed: "  \n")
    result = extender.extend("a cat", "en", seed=0)
    assert not result.ok and result.extended == "a cat" and "no text" in result.message


def test_extend_prompts_seeds_each_prompt_prints_and_frees_the_model(tiny_lm, extender, monkeypatch, capsys):
    prompts = ["a cat runs on the beach", "a dog walks in golden light"]
    expected = [extender.extend(p, "en", seed=5 + i).extended for i, p in enumerate(prompts)]
    closed = []
    original_close = LocalLMExtender.close

    def close(self):
        closed.append(self)
        original_close(self)

    monkeypatch.setattr(LocalLMExtender, "close", close)
    results = extend_prompts(prompts, "local_qwen", tiny_lm, "en", 5, "cpu", torch.float32, max_new_tokens=NEW_TOKENS)
    assert [r.extended for r in results] == expected and all(r.ok for r in results)
    assert len(closed) == 1 and closed[0].model is None
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"prompt extension 1/2 (seed 5): {expected[0]}", f"prompt extension 2/2 (seed 6): {expected[1]}"]


def test_extend_prompts_prints_a_fallback(tiny_lm, monkeypatch, capsys):
    from transformers import Qwen2ForCausalLM

    def generate(self, **inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Qwen2ForCausalLM, "generate", generate)
    results = extend_prompts(["a cat"], "local_qwen", tiny_lm, "zh", 0, max_new_tokens=NEW_TOKENS)
    assert results == [Extended("a cat", "a cat", False, results[0].message)]
    assert capsys.readouterr().out.splitlines()[-1] == f"prompt extension 1/1 (seed 0): {results[0].message}: a cat"


# ---- the checks --------------------------------------------------------------------------------------------------

def test_the_tiny_model_passes_the_checks(tiny_lm):
    for lang in ("zh", "ch", "en"):
        assert check_prompt_extend("local_qwen", tiny_lm, lang, environ={}) == []


def test_unknown_method_and_language():
    problems = check_prompt_extend("openai", None, "fr", environ={})
    assert problems == ["inference.prompt_extend_target_lang = 'fr'; valid: zh or ch (Chinese; Wan's and Phantom's "
                        "names), en", "inference.prompt_extend_method = 'openai'; valid: local_qwen, dashscope"]


def test_local_qwen_needs_a_local_causal_lm_directory(tmp_path, tiny_lm):
    def problem(model):
        (found,) = check_prompt_extend("local_qwen", model, "en", environ={})
        assert found.startswith("inference.prompt_extend_model"), found
        return found

    assert "not given" in problem(None)
    assert "no such directory" in problem("Qwen/Qwen2.5-14B-Instruct")  # a hub name: nothing is downloaded
    file = tmp_path / "model.safetensors"
    file.write_text("x")
    assert f"= {str(file)!r}: not a directory" in problem(str(file))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in problem(str(empty))
    encoder = tmp_path / "t5"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (encoder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    assert "model_type 't5' is not a causal language model" in problem(str(encoder))
    no_chat = tmp_path / "base_lm"
    no_chat.mkdir()
    (no_chat / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (no_chat / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert "no chat template" in problem(str(no_chat))
    (no_chat / "tokenizer_config.json").unlink()
    assert "no tokenizer" in problem(str(no_chat))


def test_dashscope_without_a_key_is_refused():
    problems = check_prompt_extend("dashscope", None, "zh", environ={})
    assert any("inference.prompt_extend_method = 'dashscope' needs the DASH_API_KEY environment variable" in p
               for p in problems), problems


def test_dashscope_without_its_package_is_refused(monkeypatch):
    monkeypatch.setattr(pe, "_has_package", lambda name: False)
    problems = check_prompt_extend("dashscope", None, "en", environ={"DASH_API_KEY": "sk-test"})
    assert problems == ["inference.prompt_extend_method = 'dashscope' needs the dashscope package (pip install "
                        "dashscope); it is not installed; valid: install it, or prompt_extend_method 'local_qwen'"]


def test_dashscope_is_refused_on_this_machine():
    """No key, and (on a machine without it) no dashscope package: refused, nothing probed."""
    assert check_prompt_extend("dashscope", "qwen-plus", "en", environ={}) != []


def test_dashscope_probes_the_api_host(monkeypatch):
    monkeypatch.setattr(pe, "_has_package", lambda name: True)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    (problem,) = check_prompt_extend("dashscope", None, "en",
                                     environ={"DASH_API_KEY": "sk-test", "DASH_API_URL": f"http://127.0.0.1:{port}/v1"})
    assert problem.startswith("inference.prompt_extend_method = 'dashscope' needs the network") and str(port) in problem
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/api/v1"
        environ = {"DASH_API_KEY": "sk-test", "DASH_API_URL": url}
        assert check_prompt_extend("dashscope", None, "en", environ=environ) == []


@pytest.mark.parametrize("method", ["dashscope", "local_qwen"])
def test_extend_prompts_refuses_before_building_anything(method, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("an extender was built before the settings were checked")

    monkeypatch.setattr(pe, "LocalLMExtender", never)
    monkeypatch.setattr(pe, "DashScopeExtender", never)
    missing = str(tmp_path / "no_model_here")
    with pytest.raises(ConfigError) as err:
        extend_prompts(["a cat"], method, missing, "en", 0, environ={})
    first = err.value.problems[0]
    if method == "dashscope":
        assert "DASH_API_KEY" in first
    else:
        assert first.startswith(f"inference.prompt_extend_model = {missing!r}: no such directory")
