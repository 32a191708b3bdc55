"""extract_features.py and training on its features (``dataset_type: feature``) through torchrun on the
quickstart's synthetic assets (CPU, gloo): two processes write what one writes, training on the
features gives the losses of training on the videos with the encoders online (same seed), a corrupt
video is skipped and counted, and a rerun resumes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.wan_helpers import mindspeed_wan_model

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _torchrun(nproc: int, entry: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", entry, *flags]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _extract(assets: Path, out: Path, nproc: int = 1, data: str = "data.json", *flags: str) -> str:
    done = _torchrun(nproc, "extract_features.py", "--mm-model", str(assets / "model.json"), "--mm-data",
                     str(assets / data), "--save-features", str(out), "--num-workers", "0", "--seed", "7", *flags)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _train(model: Path, data: Path) -> list[float]:
    done = _torchrun(1, "pretrain_t2v.py", "--mm-model", str(model), "--mm-data", str(data), "--micro-batch-size",
                     "1", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "4", "--log-interval", "1",
                     "--num-workers", "0", "--seed", "7")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", done.stdout)]


def _feature_data(root: Path, features: Path) -> Path:
    path = root / f"{features.name}_data.json"
    path.write_text(json.dumps({"dataset_param": {"dataset_type": "feature", "basic_parameters": {
        "data_path": str(features / "data.jsonl"), "data_folder": str(features)}}, "dataloader_param": {"shuffle": True}}))
    return path


def _tensors(features: Path) -> dict[str, dict[str, torch.Tensor]]:
    from mm.data.features import read_features

    return {f.name: read_features(f) for f in sorted((features / "features").iterdir())}


@pytest.fixture(scope="module")
def qs(tmp_path_factory, quickstart_assets):
    return quickstart_assets(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def extracted(qs, tmp_path_factory):
    """The quickstart's features, extracted by one process: (directory, its output)."""
    one = tmp_path_factory.mktemp("one") / "features"
    return one, _extract(qs, one, 1)


@pytest.mark.slow
def test_two_processes_extract_what_one_does_and_training_on_features_equals_training_on_videos(qs, extracted,
                                                                                                  tmp_path):
    (one, out), two = extracted, tmp_path / "two"
    assert "wrote 16 feature files, 0 were there already" in out
    _extract(qs, two, 2, "data.json", "--feature-format", "pt")  # MindSpeed-MM's torch files this time
    a, b = _tensors(one), _tensors(two)
    assert [n.rsplit(".", 1)[0] for n in a] == [n.rsplit(".", 1)[0] for n in b] and len(a) == 16
    for (name, x), y in zip(a.items(), b.values()):
        assert set(x) == set(y) == {"video", "prompt_ids", "prompt_mask"}, name
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-6, atol=1e-6, msg=f"{name} {key}")
    lines = [json.loads(line) for line in (one / "data.jsonl").read_text().splitlines()]
    assert [line["bucket"] for line in lines] != [lines[0]["bucket"]] * 16  # both buckets, as the videos
    assert {tuple(line["latent_shape"]) for line in lines} == {(4, 3, 8, 8), (4, 3, 6, 12)}
    manifest = json.loads((one / "features.json").read_text())
    assert manifest["dataset_type"] == "t2v" and manifest["text_dims"] == [32]

    online = _train(qs / "model.json", qs / "data.json")
    # the model JSON without its encoders: training on features builds none
    model = json.loads((qs / "model.json").read_text())
    bare = qs / "dit_only_model.json"
    bare.write_text(json.dumps({k: v for k, v in model.items() if k not in ("ae", "text_encoder")}))
    on_features = _train(bare, _feature_data(qs, one))
    on_pt_features = _train(qs / "model.json", _feature_data(qs, two))
    assert len(online) == len(on_features) == 4 and online[-1] != online[0]
    for x, y, z in zip(online, on_features, on_pt_features):
        assert abs(x - y) <= 1e-5 * abs(x) and abs(x - z) <= 1e-5 * abs(x), (online, on_features, on_pt_features)


@pytest.mark.slow
def test_a_corrupt_video_is_skipped_and_counted_and_a_rerun_resumes(qs, tmp_path):
    import shutil

    videos = tmp_path / "data"
    shutil.copytree(qs / "data", videos)
    data = json.loads((qs / "data.json").read_text())
    (tmp_path / "data.txt").write_text(f"{videos},{videos / 'annotation.json'}\n")
    data["dataset_param"]["basic_parameters"]["data_path"] = str(tmp_path / "data.txt")
    (qs / "corrupt_data.json").write_text(json.dumps(data))
    victim = sorted((videos / "videos").glob("*.mp4"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: no decodable frame

    out_dir = tmp_path / "features"
    out = _extract(qs, out_dir, 2, "corrupt_data.json")
    assert "wrote 15 feature files, 0 were there already; skipped 1 bad samples" in out, out[-2000:]
    index = [json.loads(line) for line in (out_dir / "data.jsonl").read_text().splitlines()]
    assert len(index) == 15 and str(victim) not in {line["path"] for line in index}
    assert not list(out_dir.rglob("*.tmp"))

    # a feature file lost (an interrupted run leaves none half-written): the rerun writes it alone
    lost = sorted((out_dir / "features").iterdir())[5]
    before = lost.read_bytes()
    lost.unlink()
    out = _extract(qs, out_dir, 2, "corrupt_data.json")
    assert "wrote 1 feature files, 14 were there already; skipped 1 bad samples" in out, out[-2000:]
    assert lost.read_bytes() == before


@pytest.mark.slow
def test_wan_i2v_features_hold_the_condition_and_the_clip_tokens(qs, tmp_path):
    """Wan2.1 I2V (condition channels + CLIP branch): the features hold the condition latents and the CLIP
    tokens, and pretrain_i2v.py on them gives the losses of pretrain_i2v.py on the videos."""
    from tests.encoder_helpers import save_clip

    save_clip(qs / "clip")
    model = json.loads((qs / "model.json").read_text())
    model["predictor"].update(in_dim=2 * 4 + 4, image_dim=16)
    model["image_encoder"] = {"model_id": "clip", "from_pretrained": str(qs / "clip"), "dtype": "fp32"}
    (qs / "i2v_model.json").write_text(json.dumps(model))
    data = json.loads((qs / "data.json").read_text())
    data["dataset_param"]["dataset_type"] = "i2v"
    (qs / "i2v_data.json").write_text(json.dumps(data))
    features = tmp_path / "i2v"
    done = _torchrun(1, "extract_features.py", "--mm-model", str(qs / "i2v_model.json"), "--mm-data",
                     str(qs / "i2v_data.json"), "--save-features", str(features), "--num-workers", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = next(iter(_tensors(features).values()))
    assert first["condition"].shape[0] == 4 + 4 and first["context_image"].shape == (5, 16)
    assert json.loads((features / "features.json").read_text())["dataset_type"] == "i2v"

    def train(model_json: Path, data_json: Path) -> list[float]:
        done = _torchrun(1, "pretrain_i2v.py", "--mm-model", str(model_json), "--mm-data", str(data_json),
                         "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "3",
                         "--log-interval", "1", "--num-workers", "0", "--seed", "11")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", done.stdout)]

    online = train(qs / "i2v_model.json", qs / "i2v_data.json")
    bare = qs / "i2v_dit_only_model.json"  # no VAE, text or image encoder
    bare.write_text(json.dumps({k: v for k, v in model.items() if k not in ("ae", "text_encoder", "image_encoder")}))
    on_features = train(bare, _feature_data(qs, features))
    assert len(online) == len(on_features) == 3
    for x, y in zip(online, on_features):
        assert abs(x - y) <= 1e-5 * abs(x), (online, on_features)


# MindSpeed-MM's Wan2.1 T2V layout (its key names; the sizes of the quickstart's tiny DiT): a model JSON with
# no encoders, on features, and its feature data JSON's keys
MINDSPEED_MODEL = mindspeed_wan_model(text_len=24, dtype="fp32")


def _mindspeed_data(features: Path, tokenizer: Path) -> dict:
    return {"dataset_param": {
        "dataset_type": "feature",
        "basic_parameters": {"data_path": str(features / "data.jsonl"), "data_folder": str(features)},
        "preprocess_parameters": {"video_processor_type": "OpensoraplanVideoProcessor", "num_frames": 9,
                                  "max_height": 64, "max_width": 64, "train_fps": 8, "cfg": 0.0, "hw_stride": 8},
        "use_text_processer": True, "enable_text_preprocessing": False,
        "tokenizer_config": [{"autotokenizer_name": "AutoTokenizer", "hub_backend": "hf",
                              "from_pretrained": str(tokenizer), "model_max_length": 16}]},
        "dataloader_param": {"dataloader_mode": "sampler", "sampler_type": "LengthGroupedSampler", "shuffle": True,
                             "drop_last": True, "pin_memory": True, "group_frame": False, "group_resolution": False,
                             "group_data": True, "initial_global_step_for_sampler": 0}}


@pytest.mark.slow
def test_mindspeed_mm_s_wan_layout_trains_on_features_as_mm_s_own(qs, extracted, tmp_path):
    """Its model JSON (wandit, wan_flow_match_scheduler: the grid of timesteps and bsmntw weights, text_len
    padding) and feature data JSON: the losses of the same model in mm's own layout."""
    features, _ = extracted
    (tmp_path / "model.json").write_text(json.dumps(MINDSPEED_MODEL))
    (tmp_path / "data.json").write_text(json.dumps(_mindspeed_data(features, qs / "umt5")))
    own = {"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 64, "ffn_dim": 128,
                         "in_dim": 4, "out_dim": 4, "freq_dim": 32, "text_dim": 32, "text_len": 24},
           "diffusion": {"model_id": "flow_matching", "shift": 5, "timestep_grid": 1000, "sigma_min": 0.0,
                         "extra_one_step": True, "loss_weighting": "bsmntw"}}
    (tmp_path / "own.json").write_text(json.dumps(own))

    def train(model: Path, data: Path) -> tuple[list[float], str]:
        done = _torchrun(1, "pretrain_t2v.py", "--mm-model", str(model), "--mm-data", str(data), "--micro-batch-size",
                         "1", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "3", "--log-interval", "1",
                         "--num-workers", "0", "--seed", "7")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", done.stdout)], done.stdout

    theirs, out = train(tmp_path / "model.json", tmp_path / "data.json")
    ours, _ = train(tmp_path / "own.json", _feature_data(tmp_path, features))
    assert "bsmntw loss weights" in out and "LengthGroupedSampler with group_data" in out
    assert len(theirs) == 3 and theirs == ours


MINDSPEED_REF = os.environ.get("MM_MINDSPEED_MM_REF")


@pytest.mark.skipif(not MINDSPEED_REF, reason="set MM_MINDSPEED_MM_REF to a MindSpeed-MM checkout to read its files")
def test_mindspeed_mm_s_own_wan_files_validate(qs, extracted, tmp_path):
    """MindSpeed-MM's examples/wan2.1/1.3b/t2v/pretrain_model.json and feature_data.json, as they are but for the
    data and tokenizer paths: valid for its 8-rank launch (the 1.3B DiT, PP 1)."""
    from mm.arguments import config_from_args, parse_flags
    from mm.runtime import model_json_reader
    from mm.training.checks import check_task

    def load_config(argv, world_size, mode):  # as the entry points read it: MindSpeed-MM's layout translated
        return config_from_args(parse_flags(argv), world_size, mode=mode, expand=model_json_reader())

    features, _ = extracted
    example = Path(MINDSPEED_REF) / "examples/wan2.1/1.3b/t2v"
    data = json.loads((example / "feature_data.json").read_text())
    data["dataset_param"]["basic_parameters"] = {"data_path": str(features / "data.jsonl"),
                                                 "data_folder": str(features)}
    for entry in data["dataset_param"]["tokenizer_config"]:
        entry["from_pretrained"] = str(qs / "umt5")
    (tmp_path / "feature_data.json").write_text(json.dumps(data))
    config = load_config(["--mm-model", str(example / "pretrain_model.json"), "--mm-data",
                          str(tmp_path / "feature_data.json"), "--micro-batch-size", "1", "--lr", "1e-5",
                          "--train-iters", "5000", "--bf16"], world_size=8, mode="train")
    check_task("t2v", config)
    assert config.model.predictor.model_id == "wan_dit" and config.data.features
    # its I2V files (the CLIP branch, clip_token_len): image-conditioned features without a features.json
    example = Path(MINDSPEED_REF) / "examples/wan2.1/1.3b/i2v"
    data["dataset_param"]["basic_parameters"]["data_path"] = str(features / "data.jsonl")
    (tmp_path / "i2v_data.json").write_text(json.dumps(data))
    manifest = (features / "features.json").read_bytes()
    (features / "features.json").unlink()
    try:
        config = load_config(["--mm-model", str(example / "pretrain_model.json"), "--mm-data",
                              str(tmp_path / "i2v_data.json"), "--micro-batch-size", "1", "--lr", "1e-5",
                              "--train-iters", "5000", "--bf16"], world_size=8, mode="train")
        check_task("i2v", config)
    finally:
        (features / "features.json").write_bytes(manifest)
    assert config.data.dataset_type == "i2v" and config.model.predictor.params["image_dim"] == 1280


@pytest.mark.slow
def test_mindspeed_mm_s_encoders_only_model_json_extracts_what_mm_s_does(qs, extracted, tmp_path):
    """MindSpeed-MM's feature-extraction model JSON (examples/wan2.1/feature_extract/model_t2v.json's keys: its
    VAE and UMT5, no predictor): the features of the quickstart's own model JSON, tensor for tensor, and a
    features.json naming the Wan DiT of the VAE's latent channels."""
    ours, _ = extracted
    model = json.loads((qs / "model.json").read_text())
    theirs_json = {"ae": {"model_id": "wan_video_vae", "from_pretrained": model["ae"]["from_pretrained"],
                          "dtype": "float32", "enable_tiling": False, "norm_latents": True,
                          "norm_mode": "channel_specified_shift_scale", "do_sample": False},
                   "text_encoder": {"model_id": "UMT5", "dtype": "fp32", "hub_backend": "hf",
                                    "from_pretrained": model["text_encoder"]["from_pretrained"]}}
    (tmp_path / "model.json").write_text(json.dumps(theirs_json))
    (tmp_path / "data.json").write_text((qs / "data.json").read_text())
    out = tmp_path / "features"
    stdout = _extract(tmp_path, out, 1)
    assert "no predictor: the features are for a Wan DiT of 4 latent channels, t2v" in stdout
    manifest = json.loads((out / "features.json").read_text())
    assert manifest["model_id"] == "wan_dit" and manifest["latent_channels"] == 4
    mine, theirs = _tensors(ours), _tensors(out)
    assert sorted(mine) == sorted(theirs) and mine
    for name in mine:
        assert sorted(mine[name]) == sorted(theirs[name])
        for key in mine[name]:
            assert torch.equal(mine[name][key], theirs[name][key]), (name, key)


@pytest.mark.skipif(not MINDSPEED_REF, reason="set MM_MINDSPEED_MM_REF to a MindSpeed-MM checkout to read its files")
def test_mindspeed_mm_s_own_feature_extraction_files_extract(qs, tmp_path):
    """MindSpeed-MM's examples/wan2.1/feature_extract/model_t2v.json and data.json as they are but for the weight,
    data and tokenizer paths and the sizes: extracted on 2 processes (its train_pipeline, its tiling, no predictor)."""
    example = Path(MINDSPEED_REF) / "examples/wan2.1/feature_extract"
    own = json.loads((qs / "model.json").read_text())
    model = json.loads((example / "model_t2v.json").read_text())
    model["ae"].update(from_pretrained=own["ae"]["from_pretrained"], dtype="fp32")
    model["text_encoder"].update(from_pretrained=own["text_encoder"]["from_pretrained"], dtype="fp32")
    data = json.loads((example / "data.json").read_text())
    ds = data["dataset_param"]
    ds["basic_parameters"]["data_path"] = str(qs / "data" / "data.txt")
    ds["tokenizer_config"].update(from_pretrained=own["text_encoder"]["from_pretrained"], model_max_length=16)
    ds["preprocess_parameters"].update(num_frames=9, max_height=64, max_width=64, max_hxw=4096)
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "data.json").write_text(json.dumps(data))
    out = _extract(tmp_path, tmp_path / "features", 2)
    assert "no predictor: the features are for a Wan DiT" in out
    manifest = json.loads((tmp_path / "features" / "features.json").read_text())
    assert manifest["model_id"] == "wan_dit" and len((tmp_path / "features" / "data.jsonl").read_text().splitlines()) > 0
