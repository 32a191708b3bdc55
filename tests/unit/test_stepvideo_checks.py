"""Bad Step-Video-T2V input is refused before anything starts: through the entry points
(``pretrain_t2v.py``'s ``pretrain``, ``inference.py``'s ``inference``, in-process, exit status 2 before
any process group) and through their checks (``mm.runtime.configure`` then ``check_task`` /
``sampling_config``), on the tiny release of ``tests/stepvideo_assets.py``:

- frame counts that are not a multiple of 17 (the VAE's chunks), training and inference;
- sizes that are not multiples of 16 (the VAE's spatial compression x the DiT's patch 1), training
  (``max_height`` / ``max_width``, buckets) and inference (``height`` / ``width``);
- a TP x Ulysses layout that does not divide the heads (TP5, Ulysses 5, TP2 x Ulysses 5 with the
  release's 48 heads), with the valid products listed; ring attention has no head constraint;
- a release directory without ``step_llm``, the VAE file or ``hunyuan_clip`` (or parts of them),
  the data JSON's tokenizers, the DiT's ``transformer/`` directory.

Every message names the key or flag, the value and what is valid."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from mm.arguments import ConfigError
from tests.stepvideo_assets import make_assets

HEADS_48 = "1, 2, 3, 4, 6, 8, 12, 16, 24, 48"
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("stepvideo_checks"), num_videos=2)


@pytest.fixture
def run(assets, tmp_path, monkeypatch):
    """``run(mode, model=..., data=..., flags=..., world=...)``: the entry point's checks of a configuration
    (``configure``, then ``check_task`` or ``sampling_config``, what ``start`` calls); returns the problems
    (empty when accepted). ``model`` / ``data``: functions editing a copy of the tiny assets' JSONs."""
    from mm.inference.runner import sampling_config
    from mm.runtime import configure
    from mm.training.checks import check_task

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)

    def go(mode: str, model=None, data=None, flags=(), world: int = 1) -> list[str]:
        argv, _ = _argv(assets, tmp_path, mode, model, data, flags)
        _world(monkeypatch, world)
        try:
            config, _, _ = configure(argv, "train" if mode == "train" else "inference")
            if mode == "train":
                check_task("t2v", config)
            else:
                sampling_config(config)
        except ConfigError as e:
            return e.problems
        return []

    return go


def _argv(assets, tmp_path: Path, mode: str, model=None, data=None, flags=()) -> tuple[list[str], Path]:
    source = assets.model if mode == "train" else assets.inference
    model_json = json.loads(source.read_text())
    if model is not None:
        model(model_json)
    model_path = tmp_path / f"{mode}_model.json"
    model_path.write_text(json.dumps(model_json))
    argv = ["--mm-model", str(model_path)]
    if mode == "train":
        data_json = json.loads(assets.data.read_text())
        if data is not None:
            data(data_json)
        data_path = tmp_path / "data.json"
        data_path.write_text(json.dumps(data_json))
        argv += ["--mm-data", str(data_path), "--micro-batch-size", "1", "--lr", "1e-4", "--train-iters", "1",
                 "--num-workers", "0", "--tensorboard-dir", str(tmp_path / "tb")]
    return argv + list(flags), model_path


def _world(monkeypatch, world: int) -> None:
    if world == 1:
        return
    for name, value in (("RANK", "0"), ("WORLD_SIZE", str(world)), ("LOCAL_RANK", "0"),
                        ("LOCAL_WORLD_SIZE", str(world)), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29599")):
        monkeypatch.setenv(name, value)


def _preprocess(**changes):
    def edit(data):
        p = data["dataset_param"]["preprocess_parameters"]
        for key, value in changes.items():
            if value is None:
                p.pop(key, None)
            else:
                p[key] = value
    return edit


def _inference(**changes):
    def edit(model):
        model["inference"].update(changes)
    return edit


def _heads(n: int):
    def edit(model):
        model["predictor"]["num_heads"] = n
    return edit


# ------------------------------------------------------------------------------ the entry points themselves


@pytest.fixture
def entry(assets, tmp_path, monkeypatch, capsys):
    """``entry(mode, ...)``: pretrain_t2v.py's / inference.py's function in-process; returns (exit status,
    stderr). Starting a process group is an error here: every case must stop before."""
    import mm.runtime

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)

    def started(*args, **kwargs):
        raise AssertionError("the configuration was accepted: a process group was about to start")

    monkeypatch.setattr(mm.runtime, "init_distributed", started)

    def go(mode: str, model=None, data=None, flags=(), world: int = 1) -> tuple[int, str]:
        from mm.inference.runner import inference
        from mm.training.pretrain import pretrain

        argv, _ = _argv(assets, tmp_path, mode, model, data, flags)
        _world(monkeypatch, world)
        with pytest.raises(SystemExit) as stop:
            pretrain(argv, task="t2v") if mode == "train" else inference(argv)
        return stop.value.code, capsys.readouterr().err

    return go


def test_the_tiny_release_is_accepted(run):
    assert run("train") == []
    assert run("inference") == []


@pytest.mark.parametrize("mode,model,data,message", [
    ("train", None, _preprocess(num_frames=20),
     "dataset_param.preprocess_parameters.num_frames = 20; valid: a positive multiple of 17"),
    ("train", None, _preprocess(max_height=40),
     "dataset_param.preprocess_parameters.max_height = 40; valid: a positive multiple of 16"),
    ("inference", _inference(num_frames=20), None, "inference.num_frames = 20; valid: 17k (17, 34, 51, ...)"),
    ("inference", _inference(width=24), None, "inference.width = 24; valid: a multiple of 16"),
    ("train", None, None, None),  # the release directory without step_llm: below
], ids=["train-frames", "train-height", "inference-frames", "inference-width", "train-no-step-llm"])
def test_entry_points_exit_2_naming_the_key(entry, assets, tmp_path, mode, model, data, message):
    if message is None:  # step_llm missing from the release directory
        def model(m):
            m["text_encoder"][0]["from_pretrained"] = str(tmp_path / "release" / "step_llm")
        message = f"text_encoder[0].from_pretrained = '{tmp_path / 'release' / 'step_llm'}': no such directory"
    code, err = entry(mode, model=model, data=data)
    assert code == 2, err[-3000:]
    assert message in err, err[-3000:]
    assert err.startswith("pretrain_t2v.py: error: " if mode == "train" else "inference.py: error: ")


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("flags,world,product", [
    (["--tensor-model-parallel-size", "5"], 5, "(5) x Ulysses degree (1, from --context-parallel-algo ulysses_cp_algo "
                                               "and --context-parallel-size) = 5"),
    (["--context-parallel-size", "5"], 5, "(1) x Ulysses degree (5, from --context-parallel-algo ulysses_cp_algo and "
                                          "--context-parallel-size) = 5"),
    (["--tensor-model-parallel-size", "2", "--context-parallel-size", "5"], 10, "(2) x Ulysses degree (5"),
    (["--context-parallel-size", "10", "--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "5"], 10,
     "(1) x Ulysses degree (5, from --context-parallel-algo hybrid_cp_algo and --ulysses-degree-in-cp) = 5"),
], ids=["TP5", "Ulysses5", "TP2xUlysses5", "hybrid-Ulysses5"])
def test_a_layout_that_does_not_divide_48_heads_lists_the_valid_products(entry, mode, flags, world, product):
    code, err = entry(mode, model=_heads(48), flags=flags, world=world)
    assert code == 2, err[-3000:]
    assert f"predictor.num_heads = 48 is not divisible by --tensor-model-parallel-size {product}" in err, err[-3000:]
    assert f"valid: TP x Ulysses degree among the divisors of 48 ({HEADS_48}); ring attention " \
           "(--context-parallel-algo megatron_cp_algo) splits no heads" in err


@pytest.mark.parametrize("flags,world", [
    (["--context-parallel-size", "3"], 3),  # Ulysses 3: 48 = 3 x 16
    (["--tensor-model-parallel-size", "3", "--context-parallel-size", "2"], 6),
    (["--context-parallel-size", "5", "--context-parallel-algo", "megatron_cp_algo"], 5),  # ring: any CP
], ids=["Ulysses3", "TP3xUlysses2", "ring5"])
def test_layouts_that_divide_48_heads_or_use_ring_attention_pass_the_layout_rules(run, flags, world):
    # the tiny model has 2 heads of its own, so only the layout rules are asked here, with 48 heads
    def with_48(model):
        model["predictor"]["num_heads"] = 48
    problems = run("inference", model=with_48, flags=flags, world=world)
    assert not [p for p in problems if "num_heads" in p], problems


def test_training_sizes_and_frames_of_buckets_and_the_osp_geometry(run):
    problems = run("train", data=_preprocess(num_frames=None, max_height=None, max_width=None,
                                             buckets=[[17, 32, 32], [20, 40, 32], [34, 32, 24]]))
    assert problems == [
        "dataset_param.preprocess_parameters.buckets entry [20, 40, 32]: frames 20 is not a multiple of 17 (the "
        "VAE's chunks of 17 frames); height 40 is not a multiple of 16 (the Step-Video VAE's spatial compression 16 "
        "x the DiT's patch 1)",
        "dataset_param.preprocess_parameters.buckets entry [34, 32, 24]: width 24 is not a multiple of 16 (the "
        "Step-Video VAE's spatial compression 16 x the DiT's patch 1)"]
    problems = run("train", data=_preprocess(max_width=24))
    assert problems == ["dataset_param.preprocess_parameters.max_width = 24; valid: a positive multiple of 16 (the "
                        "Step-Video VAE's spatial compression 16 x the DiT's patch 1), e.g. 16 or 32"]
    problems = run("train", data=_preprocess(num_frames=33, max_hxw=1024, force_resolution=False, max_height=None,
                                             max_width=None))
    assert any("force_resolution / max_hxw (Open-Sora-Plan's per-sample geometry)" in p and "num_frames (a multiple "
               "of 17) with max_height / max_width, or buckets" in p for p in problems), problems


def test_every_problem_is_reported_at_once(run, tmp_path):
    def model(m):
        m["text_encoder"][1]["from_pretrained"] = str(tmp_path / "nowhere" / "clip_text_encoder")
        m["ae"]["from_pretrained"] = str(tmp_path / "nowhere" / "vae")
    problems = run("train", model=model, data=_preprocess(num_frames=18, max_height=40))
    assert len(problems) == 4, problems
    assert [p.split(" = ")[0] for p in problems] == [
        "ae.from_pretrained", "text_encoder[1].from_pretrained", "dataset_param.preprocess_parameters.max_height",
        "dataset_param.preprocess_parameters.num_frames"]


# ------------------------------------------------------------------------------ the release's files


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_missing_release_directories_are_named(run, assets, tmp_path, mode):
    gone = tmp_path / "gone"
    cases = {
        "step_llm": (lambda m: m["text_encoder"][0].update(from_pretrained=str(gone / "step_llm")),
                     f"text_encoder[0].from_pretrained = '{gone / 'step_llm'}': no such directory; valid: the "
                     "release's step_llm/ directory (config.json, model-*.safetensors with model.safetensors.index.json, "
                     "step1_chat_tokenizer.model)"),
        "hunyuan_clip": (lambda m: m["text_encoder"][1].update(from_pretrained=str(gone / "hunyuan_clip")),
                         f"text_encoder[1].from_pretrained = '{gone / 'hunyuan_clip'}': no such directory; valid: the "
                         "release's hunyuan_clip/ directory or hunyuan_clip/clip_text_encoder"),
        "vae": (lambda m: m["ae"].update(from_pretrained=str(gone / "vae")),
                f"ae.from_pretrained = '{gone / 'vae'}': no such file or directory; valid: the release's vae/ "
                "directory (holding vae_v2.safetensors for ae.version = 2) or that file itself"),
    }
    for name, (edit, message) in cases.items():
        problems = run(mode, model=edit)
        assert len(problems) == 1 and problems[0].startswith(message), (name, problems)


def test_incomplete_release_directories_say_what_is_missing(run, assets, tmp_path):
    # step_llm without its tokenizer, and with an index naming a shard that is not there
    llm = _copy(assets.root / "step_llm", tmp_path / "step_llm")
    (llm / "step1_chat_tokenizer.model").unlink()
    (llm / "tokenizer.json").unlink(missing_ok=True)
    shard = sorted(llm.glob("model-*.safetensors"))[-1]
    shard.unlink()
    problems = run("inference", model=lambda m: m["text_encoder"][0].update(from_pretrained=str(llm)))
    assert problems == [f"text_encoder[0].from_pretrained = '{llm}': model.safetensors.index.json names 1 file(s) not "
                        f"there: {shard.name}; no step1_chat_tokenizer.model (the Step-LLM tokenizer); valid: the "
                        "release's step_llm/ directory (config.json, model-*.safetensors with "
                        "model.safetensors.index.json, step1_chat_tokenizer.model)"]
    # the vae directory without vae_v2.safetensors
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "vae.safetensors").write_bytes(b"")  # version 1's file only
    problems = run("inference", model=lambda m: m["ae"].update(from_pretrained=str(vae)))
    assert problems == [f"ae.from_pretrained = '{vae}': no vae_v2.safetensors there (the release's file for "
                        "ae.version = 2; found ['vae.safetensors'])"]
    # hunyuan_clip: the encoder without weights; then without any tokenizer
    clip = _copy(assets.root / "hunyuan_clip", tmp_path / "hunyuan_clip")
    for weights in (clip / "clip_text_encoder").glob("*.safetensors"):
        weights.unlink()
    problems = run("inference", model=lambda m: m["text_encoder"][1].update(from_pretrained=str(clip)))
    assert problems == [f"text_encoder[1].from_pretrained = '{clip}': no BertModel weights in "
                        f"{clip / 'clip_text_encoder'} (model.safetensors, pytorch_model.bin); valid: the release's "
                        "hunyuan_clip/ directory or hunyuan_clip/clip_text_encoder (config.json, pytorch_model.bin; the "
                        "BertTokenizer's vocab.txt in the sibling tokenizer/)"]
    shutil.rmtree(clip / "tokenizer")
    problems = run("inference", model=lambda m: m["text_encoder"][1].update(
        from_pretrained=str(clip / "clip_text_encoder")))
    assert len(problems) == 1 and "no BertTokenizer (vocab.txt or tokenizer.json)" in problems[0], problems


def test_training_checks_the_tokenizers_the_dit_and_the_encoder_order(run, assets, tmp_path):
    gone = tmp_path / "gone"

    def tokenizers(data):
        first, second = data["dataset_param"]["tokenizer_config"]
        first["from_pretrained"] = str(gone / "step1_chat_tokenizer.model")
        second["from_pretrained"] = str(gone / "tokenizer")
    assert run("train", data=tokenizers) == [
        f"dataset_param.tokenizer_config[0].from_pretrained = '{gone / 'step1_chat_tokenizer.model'}': no such file or "
        "directory; valid: the release's step_llm/step1_chat_tokenizer.model (or its directory)",
        f"dataset_param.tokenizer_config[1].from_pretrained = '{gone / 'tokenizer'}': no such file or directory; "
        "valid: the release's hunyuan_clip/tokenizer directory (vocab.txt)"]

    def wrong_name(data):
        data["dataset_param"]["tokenizer_config"][0]["autotokenizer_name"] = "AutoTokenizer"
    assert run("train", data=wrong_name) == [
        "dataset_param.tokenizer_config[0].autotokenizer_name = 'AutoTokenizer'; valid for Step-Video: 'stepchat' "
        "(Step-LLM's step1_chat_tokenizer.model), 'BertTokenizer' (hunyuan_clip/tokenizer)"]

    def swapped(model):
        model["text_encoder"].reverse()
    problems = run("train", model=swapped)
    assert "text_encoder model_ids ['BertModel', 'StepLLmModel']: the DiT reads Step-LLM then HunyuanCLIP " \
           "(caption_channels [Step-LLM width, CLIP width]); valid order: ['StepLLmModel', 'BertModel']" in problems

    def no_dit(model):
        model["predictor"]["from_pretrained"] = str(gone / "transformer")
    assert run("train", model=no_dit) == [
        f"predictor.from_pretrained = '{gone / 'transformer'}': no such file or directory; valid: the release's "
        "transformer/ directory (config.json, diffusion_pytorch_model-*.safetensors), a .safetensors file, or leave "
        "it null and give --load (mm-convert StepVideoConverter hf_to_mm's output)"]
    # inference takes the DiT from --load when given: predictor.from_pretrained is not read then
    assert run("inference", model=no_dit, flags=["--load", str(tmp_path / "ckpt")]) == []
    assert run("inference", model=no_dit)[0].startswith(f"predictor.from_pretrained = '{gone / 'transformer'}'")


def test_a_recompute_module_the_family_does_not_implement_is_refused(run, monkeypatch):
    from mm.families.stepvideo.model import StepVideoDiT

    flags = ["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mlp"]
    assert run("train", flags=flags) == []
    monkeypatch.setattr(StepVideoDiT, "RECOMPUTE_MODULES", ("core_attn", "mlp"))  # a family without layernorm
    problems = run("train", flags=flags)
    assert any(p.startswith("--recompute-modules layernorm: predictor 'stepvideodit'") and
               "recomputes core_attn, mlp; valid: those" in p for p in problems), problems
    block = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
             "--recompute-modules", "layernorm"]  # the layers after the first: layernorm
    assert any(p.startswith("--recompute-modules layernorm: predictor 'stepvideodit'") for p in run("train", flags=block))
    # a family with no selective recompute: selective alone (megatron's default core_attn) is refused up front
    monkeypatch.setattr(StepVideoDiT, "RECOMPUTE_MODULES", ())
    problems = run("train", flags=["--recompute-granularity", "selective"])
    assert any(p.startswith("--recompute-modules core_attn: predictor 'stepvideodit'") and
               "recomputes no module selectively" in p for p in problems), problems
