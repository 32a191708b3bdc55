"""mm-plan calibrate on a GPU: the calibration from 1- and 3-layer runs predicts the activation memory
and the iteration time of the whole model at a size it did not measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.plan_assets import REPO, write_plan_assets

pytestmark = pytest.mark.gpu


def _plan(*args):
    done = subprocess.run([sys.executable, "-m", "mm.plan", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, MM_ACCELERATOR="cuda"), timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_a_calibration_predicts_the_whole_model(tmp_path):
    root = write_plan_assets(tmp_path)
    model = json.loads((root / "model.json").read_text())
    # wide enough that activations, not allocator rounding, make the figures; 8 layers
    model["predictor"].update(num_layers=8, num_heads=4, hidden_size=512, ffn_dim=2048)
    (root / "model.json").write_text(json.dumps(model))
    training = ["--mm-model", str(root / "model.json"), "--mm-data", str(root / "data.json"), "--micro-batch-size",
                "1", "--bf16", "--lr", "1e-5", "--recompute-granularity", "selective", "--recompute-modules", "mlp"]
    cal = tmp_path / "cal.json"
    _plan("calibrate", "--videos", "17x256x256", "33x256x256", "49x256x256", "--output", str(cal), "--", *training)
    table = _plan("calibrate", "--check", str(cal), "--videos", "41x256x256", "--repeats", "5", "--", *training)
    row = next(line for line in table.splitlines() if line.startswith("| 41x256x256"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    predicted, measured = float(cells[3]), float(cells[4])
    assert abs(predicted / measured - 1) < 0.10, row
    seconds, measured_s = float(cells[6]), float(cells[7])
    assert abs(seconds / measured_s - 1) < 0.25, row
    print("ok")
