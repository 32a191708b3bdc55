"""The log of a quickstart-sized run (2 processes, torchrun, the quickstart's assets): training with the
distributed optimizer and a torch_dist save, then sampling from that checkpoint. Each rank's output is
read from its own file (torchrun --log-dir --redirects 3). Quiet by default: no warning line at all,
none of ``mm.accelerator.notices.NOTICES``; with the switch (MM_VERBOSE=1, or --verbose) rank 0 shows
the notices again and every other rank still none."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mm.accelerator.notices import NOTICES

REPO = Path(__file__).resolve().parents[2]
# a warning line: Python's "file:line: SomeWarning: ..." or torch's logging "W1207 12:00:00.000 ..."
WARNING_LINE = re.compile(r"\w+Warning: |^[WE]\d{4} \d\d:\d\d:\d\d")
# the notices a CPU run of the quickstart's kind gives without the filters; not the CUDA_HOME one (only
# where a CUDA toolkit is installed) nor diffusers' (the benchmarks')
EXPECTED = [n for n in NOTICES if n.module not in ("torch.utils.cpp_extension", "diffusers.models.modeling_utils")]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, quickstart_assets):
    root = quickstart_assets(tmp_path_factory.mktemp("qs_notices"))
    model = json.loads((root / "inference_model.json").read_text())
    model["inference"].update(sample_steps=2, prompt=model["inference"]["prompt"][:1])
    (root / "inference_model.json").write_text(json.dumps(model))
    return root


def _run(tmp: Path, name: str, entry_args: list[str], **env) -> dict[int, list[str]]:
    """torchrun with 2 processes; each rank's stdout + stderr lines (rank -1: torchrun's own)."""
    logs = tmp / f"logs_{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
           str(logs), "--redirects", "3", *entry_args]
    full_env = {k: v for k, v in os.environ.items() if k not in ("MM_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    full_env.update(MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    lines = {-1: (result.stdout + result.stderr).splitlines()}
    for rank in (0, 1):
        files = list(logs.glob(f"*/attempt_0/{rank}/std*.log"))
        assert len(files) == 2, files
        lines[rank] = [line for f in files for line in f.read_text().splitlines()]
    assert result.returncode == 0, "\n".join(lines[-1][-40:] + lines[0][-40:] + lines[1][-40:])
    return lines


def _train_and_sample(root: Path, tmp: Path, name: str, verbose_env: dict, verbose_flag: list[str]):
    ckpt = tmp / f"ckpt_{name}"
    train = _run(tmp, f"{name}_train", [
        "pretrain_t2v.py", "--mm-model", str(root / "model.json"), "--mm-data", str(root / "data.json"),
        "--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo", "--use-cp-send-recv-overlap",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "2",
        "--use-distributed-optimizer", "--log-interval", "1", "--num-workers", "0", "--save", str(ckpt)],
        **verbose_env)
    sample = _run(tmp, f"{name}_sample", [
        "inference.py", *verbose_flag, "--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
        "--mm-model", str(root / "inference_model.json"), "--load", str(ckpt)])
    assert any("saved checkpoint at iteration" in line for line in train[0])
    assert any("inference.py: wrote" in line for line in sample[0])
    return {rank: train[rank] + sample[rank] for rank in (-1, 0, 1)}


def _matching(notice, lines: list[str]) -> list[str]:
    pattern = re.compile(notice.message, re.I)
    return [line for line in lines if pattern.search(line.rstrip())]


@pytest.mark.slow
def test_a_quickstart_sized_run_logs_no_third_party_notices_and_the_switch_brings_them_back(quickstart, tmp_path):
    quiet = _train_and_sample(quickstart, tmp_path, "quiet", {}, [])
    for rank, lines in quiet.items():
        assert [line for line in lines if WARNING_LINE.search(line)] == [], f"rank {rank}"
        for notice in NOTICES:
            assert _matching(notice, lines) == [], (rank, notice.message)
    # ranks other than 0 are quiet: no HuggingFace progress bars either (rank 0 shows them)
    assert not any("Loading weights" in line for line in quiet[1])
    assert any("Loading weights" in line for line in quiet[0])

    # the switch: MM_VERBOSE=1 for training, --verbose for sampling; rank 0 shows each notice, rank 1 none
    loud = _train_and_sample(quickstart, tmp_path, "verbose", {"MM_VERBOSE": "1"}, ["--verbose"])
    for notice in EXPECTED:
        assert _matching(notice, loud[0]), notice.message
    for notice in NOTICES:
        assert _matching(notice, loud[1]) == [], notice.message
    assert [line for line in loud[1] if WARNING_LINE.search(line)] == []
