"""The quickstart smoke and start-up validation as a user runs them: torchrun, real flags and JSONs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["examples/quickstart/parallel_smoke.py", "--mm-model", "examples/quickstart/model.json",
         "--mm-data", "examples/quickstart/data.json", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "3e-3", "--train-iters", "40", "--log-interval", "10", "--use-distributed-optimizer"]


def _torchrun(nproc: int, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quickstart_smoke_trains_with_tp2_pp2():
    result = _torchrun(4, SMOKE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TP=2 PP=2 VPP=1 CP=1 (ulysses_cp_algo) DP=1" in result.stdout
    assert "(fell)" in result.stdout


def test_bad_configuration_stops_before_any_process_group():
    result = _torchrun(4, SMOKE + ["--tensor-model-parallel-size", "3"], timeout=120)
    assert result.returncode != 0
    assert "parallel_smoke.py: error: invalid configuration" in result.stderr
    assert "world size 4 is not divisible by --tensor-model-parallel-size (3)" in result.stderr
    assert "rank(s) on" not in result.stdout  # nothing was started


def test_unknown_flag_stops_the_run():
    result = _torchrun(2, SMOKE + ["--tensor-model-paralel-size", "2"], timeout=120)
    assert result.returncode != 0 and "unrecognized arguments: --tensor-model-paralel-size" in result.stderr


def test_cp_scaling_benchmark_runs_on_cpu(tmp_path):
    model = tmp_path / "model.json"
    model.write_text('{"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 48, '
                     '"ffn_dim": 64, "in_dim": 4, "out_dim": 4, "freq_dim": 16, "text_dim": 16}}')
    result = _torchrun(2, ["benchmarks/cp_scaling.py", "--accelerator", "cpu", "--model", str(model), "--latent",
                           "3", "8", "12", "--text-len", "16", "--repeats", "1", "--context-parallel-algo",
                           "megatron_cp_algo", "--use-cp-send-recv-overlap"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"algo": "megatron_cp_algo", "cp": 2' in result.stdout and '"tokens": 72' in result.stdout
