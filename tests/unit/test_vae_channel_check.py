"""A DiT and a VAE of different latent channels are refused before anything starts, naming both figures
(else the first step fails with a shape error after the models load)."""

from __future__ import annotations

import json

import pytest

from mm.arguments import ConfigError, load_config
from tests.plan_assets import REPO


def _check(model: dict, data: str, tmp_path, weights: bool = True):
    from mm.training.pretrain import check_task

    (tmp_path / "model.json").write_text(json.dumps(model))
    config = load_config(["--mm-model", str(tmp_path / "model.json"), "--mm-data", data, "--micro-batch-size", "1",
                          "--lr", "1e-5", "--train-iters", "1"], world_size=1, mode="train")
    check_task("t2v", config, files=False, weights=weights)


def test_wan_dit_output_channels_against_the_vaes_config(quickstart_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    assets = quickstart_assets(tmp_path / "assets")
    model = json.loads((assets / "model.json").read_text())
    z_dim = json.loads((assets / "vae" / "config.json").read_text())["z_dim"]
    _check(model, str(assets / "data.json"), tmp_path)  # the quickstart's pair agrees
    model["predictor"].update(in_dim=z_dim + 12, out_dim=z_dim + 12)
    with pytest.raises(ConfigError) as e:
        _check(model, str(assets / "data.json"), tmp_path)
    assert f"the predictor predicts {z_dim + 12} latent channels" in str(e.value)
    assert f"has {z_dim}; valid: a DiT and a VAE of the same latent channels ({z_dim})" in str(e.value)


def test_step_video_and_open_sora_plan_vaes_from_their_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    monkeypatch.chdir(REPO)
    step = json.loads((REPO / "examples/stepvideo/t2v/pretrain_t2v_model.json").read_text())
    step_data = str(REPO / "examples/stepvideo/t2v/data.json")
    # the release's pair (64 channels) is checked from the JSON alone, without the release's files (as mm-plan)
    _check(step, step_data, tmp_path, weights=False)
    step["ae"]["z_channels"] = 16
    with pytest.raises(ConfigError, match="predicts 64 latent channels .* has 16"):
        _check(step, step_data, tmp_path, weights=False)
    osp = json.loads((REPO / "examples/opensoraplan1.3/t2v/pretrain_t2v_model.json").read_text())
    osp_data = str(REPO / "examples/opensoraplan1.3/t2v/data.json")
    _check(osp, osp_data, tmp_path, weights=False)
    osp["predictor"].update(in_channels=16, out_channels=16)
    with pytest.raises(ConfigError, match="predicts 16 latent channels .* has 8"):
        _check(osp, osp_data, tmp_path, weights=False)
