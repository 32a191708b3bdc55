"""pretrain_vae.py's configuration: its flags, its model JSON (an ``ae`` section, no predictor needed)
and what it refuses, each with the message it must give; the synthetic data's motion check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mm.arguments import ConfigError, load_config
from mm.data.synthetic import caption, follows_motion, make_dataset, render_clip

AE = {"model_id": "wan_vae", "from_pretrained": "./vae"}
DATA = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": "./data.txt"}}}


def _load(tmp_path, flags=(), model=None, world=2, mode="vae"):
    m = tmp_path / "model.json"
    m.write_text(json.dumps({"ae": AE} if model is None else model))
    d = tmp_path / "data.json"
    d.write_text(json.dumps(DATA))
    argv = ["--mm-model", str(m), "--mm-data", str(d), "--train-iters", "10", "--lr", "1e-4", *flags]
    return load_config(argv, world_size=world, mode=mode)


def _problems(tmp_path, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, **kwargs)
    return "\n".join(info.value.problems)


def test_a_vae_json_needs_no_predictor_and_the_flags_get_their_defaults(tmp_path):
    config = _load(tmp_path)
    assert config.model.predictor is None and config.model.ae.model_id == "wan_vae"
    args = config.args
    assert (args.vae_reconstruction_loss, args.vae_kl_weight, args.vae_latent_stats_samples) == ("l1", 1e-6, 64)
    assert config.sizes.data_parallel == 2
    config = _load(tmp_path, flags=["--vae-reconstruction-loss", "mse", "--vae-kl-weight", "0"])
    assert (config.args.vae_reconstruction_loss, config.args.vae_kl_weight) == ("mse", 0.0)


def test_what_pretrain_vae_refuses(tmp_path):
    flags = ["--context-parallel-size", "2", "--bf16", "--load", "x", "--vae-kl-weight", "-1",
             "--use-distributed-optimizer"]
    problems = _problems(tmp_path, flags=flags)
    for expected in ("--context-parallel-size 2: pretrain_vae.py trains data-parallel only; valid: 1",
                     "--bf16 is not supported by pretrain_vae.py (VAE training runs in fp32)",
                     "--load is not supported by pretrain_vae.py (start from weights with the model JSON's "
                     "ae.from_pretrained)",
                     "--vae-kl-weight -1.0; valid: a number >= 0",
                     "--use-distributed-optimizer is not supported by pretrain_vae.py"):
        assert expected in problems, problems
    assert "ae section, and there is none" in _problems(tmp_path, model={"predictor": {"model_id": "wan_dit"}})
    problems = _problems(tmp_path, model={"ae": {"model_id": "wfvae", "vae_cp_size": 2}})
    assert "ae.model_id = 'wfvae': pretrain_vae.py trains wan_vae" in problems
    assert "ae.vae_cp_size = 2: pretrain_vae.py encodes each video on one rank; valid: 1" in problems
    assert "--vae-latent-stats-samples" in _problems(tmp_path, flags=["--vae-latent-stats-samples", "-3"])


def test_the_dit_entry_points_refuse_the_vae_flags(tmp_path):
    model = {"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4}, "ae": AE}
    problems = _problems(tmp_path, model=model, mode="train", flags=["--vae-kl-weight", "1e-6"])
    assert "--vae-kl-weight is a flag of pretrain_vae.py (VAE training); drop it here" in problems
    assert "predictor is required" in _problems(tmp_path, model={"ae": AE}, mode="train")


@pytest.mark.parametrize("shape,colour,motion,background", [("square", "red", "left to right", "white"),
                                                            ("circle", "blue", "top to bottom", "yellow"),
                                                            ("square", "green", "bottom to top", "purple")])
def test_a_rendered_clip_follows_its_caption_and_not_another(shape, colour, motion, background):
    frames = render_clip(9, 64, 64, shape, colour, background, motion)
    report = follows_motion(frames, colour, motion)
    assert report.ok, report.text
    wrong = {"left to right": "right to left", "top to bottom": "left to right", "bottom to top": "top to bottom"}
    assert not follows_motion(frames, colour, wrong[motion]).ok
    assert not follows_motion(frames, "purple" if colour != "purple" else "red", motion).ok


def test_noise_and_a_still_shape_do_not_follow_a_motion():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    assert not follows_motion(noise, "red", "left to right").ok
    still = np.repeat(render_clip(1, 64, 64, "square", "red", "white", "left to right"), 9, axis=0)
    report = follows_motion(still, "red", "left to right")
    assert not report.ok and "travel 0.0 px along x" in report.text
    report = follows_motion(render_clip(9, 64, 64, "square", "red", "white", "left to right"), "red", "left to right")
    assert report.text.startswith("red centre x: 8 -> 56 px over 9 frames")


def test_make_dataset_with_listed_clips(tmp_path):
    clips = [("square", "red", "left to right", "white"), ("circle", "blue", "top to bottom", "yellow")]
    make_dataset(tmp_path, num_videos=4, frames=5, sizes=[(64, 64)], clips=clips)
    records = json.loads((tmp_path / "annotation.json").read_text())
    assert [r["cap"] for r in records] == [caption(*c) for c in clips * 2]
    assert records[0]["cap"] == "a red square moving left to right on a white background"
    with pytest.raises(ValueError, match="colour 'pink'; valid: red, green"):
        make_dataset(tmp_path / "bad", num_videos=1, clips=[("square", "pink", "left to right", "white")])
