"""Wan's and Phantom's own files and generate config on one GPU: the Phantom config (task s2v-1.3B,
size 832*480, ckpt_dir, phantom_ckpt, nulls) over the tiny original-layout release, sampled in bf16
with the text encoder read from Wan's .pth in bf16, as Wan's configs run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu


def test_phantoms_generate_config_on_a_gpu(tmp_path):
    from PIL import Image

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "tests.wan_release_assets", str(tmp_path)], cwd=REPO,
                          env=dict(env, MM_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, size in (("a.png", (200, 300)), ("b.png", (400, 120))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    config = {"inference": {"task": "s2v-1.3B", "size": "832*480", "frame_num": 5, "ckpt_dir": "./Wan2.1-T2V-1.3B",
                            "phantom_ckpt": "./Phantom-Wan-1.3B/Phantom-Wan-1.3B.pth", "offload_model": False,
                            "t5_cpu": False, "base_seed": 40, "sample_solver": "unipc", "sample_steps": None,
                            "sample_shift": None, "sample_guide_scale_img": 5.0, "sample_guide_scale_text": 7.5,
                            "prompt": "a person runs over the street", "ref_image": "a.png,b.png",
                            "save_latents": True}}
    (tmp_path / "phantom.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, str(REPO / "inference.py"), "--bf16", "--mm-model", "phantom.json"],
                          cwd=tmp_path, env=dict(env, MM_ACCELERATOR="cuda"), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "50 unipc steps" in done.stdout and "is not s2v-1.3B's architecture" in done.stdout
    (video,) = (tmp_path / "outputs" / "samples").glob("*.mp4")
    import torch

    latents = torch.load(next(video.parent.glob("*.latents.pt")))
    assert latents.shape == (1, 16, 2, 60, 104) and torch.isfinite(latents).all()
