"""mm-convert with the training entry point: HuggingFace weights converted for TP2 x PP2 train as
the same weights loaded from HuggingFace on one process; a training checkpoint (torch_dist)
converts back to a diffusers directory, directly or through resplit to the torch format."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.functional.test_pretrain_t2v import REPO, _lines, _one_process, _train


def _mm_convert(cwd, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "checkpoint", "WanConverter", "--version", "wan2.1", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def _hf_dir_with_config(assets, tmp_path):
    """The fixture's DiT weights (diffusers names) with the config.json diffusers writes beside them."""
    from mm.families import predictor_config
    from mm.models.predictor.wan.hf_config import diffusers_config

    pred = json.loads((assets / "model.json").read_text())["predictor"]
    params = {k: v for k, v in pred.items() if k not in ("model_id", "dtype", "num_layers", "num_heads",
                                                          "from_pretrained")}
    arch = dataclasses.asdict(predictor_config("wan_dit", params, pred["num_layers"], pred["num_heads"]))
    hf = tmp_path / "hf"
    shutil.copytree(assets / "dit", hf)
    (hf / "config.json").write_text(json.dumps(diffusers_config(arch)))
    return hf


ITERS = 5  # as test_pretrain_t2v.py's layout runs


@pytest.mark.slow
def test_converted_weights_train_under_tp2_pp2_as_on_one_process(assets, tmp_path):
    hf = _hf_dir_with_config(assets, tmp_path)
    out = _mm_convert(tmp_path, "hf_to_mm", "--cfg.source_path", str(hf), "--cfg.target_path", str(tmp_path / "mm"),
                      "--cfg.target_parallel_config.tp_size", "2", "--cfg.target_parallel_config.pp_layers", "[2,2]")
    assert "as TP2 PP2" in out
    # the model JSON without from_pretrained: the weights come only from --load
    model = json.loads((assets / "model.json").read_text())
    del model["predictor"]["from_pretrained"]
    model["predictor"]["pipeline_num_layers"] = [2, 2]
    (assets / "converted_model.json").write_text(json.dumps(model))
    shutil.copy(assets / "data.json", assets / "converted_data.json")
    # the run test_pretrain_t2v.py's layouts compare with: one process from the HuggingFace weights
    ref = _lines(_one_process(assets, iters=ITERS, gbs=4)[1])
    _, log = _train(assets, 4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--load", str(tmp_path / "mm"), "--no-load-optim", "--no-load-rng", iters=ITERS, gbs=4,
                    variant="converted")
    assert "loaded model weights from" in log and "release" in log
    got = _lines(log)
    assert sorted(got) == sorted(ref) == list(range(1, ITERS + 1))
    for i in got:
        assert abs(float(got[i][0]) - float(ref[i][0])) <= 2e-5 * float(ref[i][0]), (i, got[i], ref[i])
    # one process, no pipelining: without --no-load-optim/--finetune the error says what converted
    # weights need; with --finetune they train as the HuggingFace weights do
    _mm_convert(tmp_path, "hf_to_mm", "--cfg.source_path", str(hf), "--cfg.target_path", str(tmp_path / "mm1"))
    del model["predictor"]["pipeline_num_layers"]
    (assets / "converted1_model.json").write_text(json.dumps(model))
    shutil.copy(assets / "data.json", assets / "converted1_data.json")
    with pytest.raises(AssertionError, match="holds no optimizer state .* load with --no-load-optim or --finetune"):
        _train(assets, 1, "--load", str(tmp_path / "mm1"), iters=ITERS, gbs=4, variant="converted1")
    got = _lines(_train(assets, 1, "--load", str(tmp_path / "mm1"), "--finetune", iters=ITERS, gbs=4,
                       variant="converted1")[1])
    assert got == ref


def test_training_checkpoint_converts_back_to_diffusers(assets, tmp_path):
    from tests.parallel.test_convert import _diffusers_load

    ckpt = tmp_path / "ckpt"
    _train(assets, 2, "--tensor-model-parallel-size", "2", "--save", str(ckpt), iters=2)
    _mm_convert(tmp_path, "mm_to_hf", "--cfg.source_path", str(ckpt), "--cfg.target_path", str(tmp_path / "direct"))
    _mm_convert(tmp_path, "resplit", "--cfg.source_path", str(ckpt), "--cfg.target_path", str(tmp_path / "torch1"))
    _mm_convert(tmp_path, "mm_to_hf", "--cfg.source_path", str(tmp_path / "torch1"),
                "--cfg.target_path", str(tmp_path / "via_resplit"))
    direct = load_file(str(tmp_path / "direct" / "diffusion_pytorch_model.safetensors"))
    via = load_file(str(tmp_path / "via_resplit" / "diffusion_pytorch_model.safetensors"))
    initial = load_file(str(assets / "dit" / "diffusion_pytorch_model.safetensors"))
    assert set(direct) == set(via) and set(direct) <= set(initial) and len(direct) > 40
    assert all(torch.equal(direct[k], via[k]) for k in direct)
    assert any(not torch.equal(direct[k], initial[k]) for k in direct)  # these are the trained weights
    model = _diffusers_load(tmp_path / "direct")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in direct.items())
