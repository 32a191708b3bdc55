"""pretrain_vae.py through torchrun on the quickstart's synthetic videos (CPU, gloo): data-parallel
training equals one process with the same global batch, and the saved VAE is what ae.from_pretrained
reads, with the latent statistics of the data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vae_assets(tmp_path_factory, quickstart_assets):
    return quickstart_assets(tmp_path_factory.mktemp("vae"))


def _train(assets, out, nproc, *flags, mbs=1, gbs=2, iters=3):
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "pretrain_vae.py", "--mm-model", str(assets / "model.json"), "--mm-data", str(assets / "vae_data.json"),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--lr", "1e-3", "--train-iters",
           str(iters), "--log-interval", "1", "--num-workers", "0", "--seed", "7", "--vae-kl-weight", "1e-3",
           "--vae-latent-stats-samples", "4", "--save", str(out), *flags]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", result.stdout)], result.stdout


@pytest.mark.slow
def test_data_parallel_training_equals_one_process_and_saves_a_loadable_vae(vae_assets, tmp_path):
    from mm.arguments import AEConfig
    from mm.models.ae import load_vae

    ref, out = _train(vae_assets, tmp_path / "one", 1, mbs=2)
    par, par_out = _train(vae_assets, tmp_path / "two", 2, mbs=1)
    assert "DP=2" in par_out and "saved the VAE (iteration 3)" in par_out
    assert len(ref) == len(par) == 3 and ref[-1] != ref[0]
    for a, b in zip(ref, par):
        assert abs(a - b) <= 1e-5 * abs(a), (ref, par)
    # gradient accumulation (2 micro-batches of 1 an iteration) trains too; the sampler groups its samples
    # in global micro-batches of 1, so they are not those of the runs above
    accumulated, _ = _train(vae_assets, tmp_path / "accumulated", 1, mbs=1, iters=2)
    assert len(accumulated) == 2 and all(0 < loss < 10 for loss in accumulated)
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("one", "two")]
    for key in ("latents_mean", "latents_std"):
        torch.testing.assert_close(torch.tensor(configs[0][key]), torch.tensor(configs[1][key]), rtol=1e-3, atol=1e-4)
    assert configs[0]["latents_std"] != [1.0] * 4
    vae = load_vae(AEConfig(model_id="wan_vae", from_pretrained=str(tmp_path / "two")))
    assert vae.latents_std.flatten().tolist() == pytest.approx(configs[1]["latents_std"])
    trained = vae.state_dict()
    initial = load_vae(AEConfig(model_id="wan_vae", from_pretrained=str(vae_assets / "vae"))).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    assert not list(tmp_path.glob(".two.*"))  # the save's temporary directories are gone


def test_a_bad_configuration_is_refused_before_starting(vae_assets, tmp_path):
    base = [sys.executable, "pretrain_vae.py", "--mm-model", str(vae_assets / "model.json"), "--mm-data",
            str(vae_assets / "vae_data.json"), "--train-iters", "2", "--lr", "1e-3", "--save", str(tmp_path / "vae")]
    for flags, expected in ((["--vae-reconstruction-loss", "l2"], "argument --vae-reconstruction-loss: invalid "
                             "choice: 'l2' (choose from 'l1', 'mse')"),
                            (["--context-parallel-size", "2"], "--context-parallel-size 2: pretrain_vae.py trains "
                             "data-parallel only; valid: 1 (leave it out)")):
        done = subprocess.run(base + flags, cwd=REPO, env=dict(os.environ, MM_ACCELERATOR="cpu"), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and "pretrain_vae.py: error: " in done.stderr, done.stderr
        assert expected in done.stderr, done.stderr
    assert not (tmp_path / "vae").exists()
