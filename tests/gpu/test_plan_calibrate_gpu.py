"""mm-plan calibrate on a GPU: the calibration from 1- and 3-layer runs predicts the activation memory
and the iteration time of the whole model at a size it did not measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.plan_assets import REPO

pytestmark = pytest.mark.gpu


def _plan(*args):
    done = subprocess.run([sys.executable, "-m", "mm.plan", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, MM_ACCELERATOR="cuda"), timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_a_calibration_predicts_the_whole_model(tmp_path):
    from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    # calibration reads no video: the VAE's config (its compression) and the tokenizer's length only
    root = tmp_path
    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)), root / "vae")
    save_tiny_text_encoder(root / "umt5", ["a", "red", "square"], d_model=32)
    # wide enough that activations, not allocator rounding, make the figures; 8 layers
    model = {"predictor": {"model_id": "wan_dit", "num_layers": 8, "num_heads": 4, "hidden_size": 512,
                           "ffn_dim": 2048, "in_dim": 4, "out_dim": 4, "freq_dim": 32, "text_dim": 32},
             "ae": {"model_id": "wan_vae", "from_pretrained": str(root / "vae")},
             "text_encoder": {"model_id": "umt5", "from_pretrained": str(root / "umt5")},
             "diffusion": {"model_id": "flow_matching", "shift": 3.0}}
    data = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": str(root / "data.txt")},
                              "preprocess_parameters": {"num_frames": 17, "max_height": 256, "max_width": 256},
                              "tokenizer_config": {"from_pretrained": str(root / "umt5"), "model_max_length": 16}}}
    (root / "model.json").write_text(json.dumps(model))
    (root / "data.json").write_text(json.dumps(data))
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
