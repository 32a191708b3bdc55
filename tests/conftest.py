"""Test-session set-up: GPU tests are skipped where torch sees no CUDA GPU; the quickstart's assets
are made once a session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the accelerator machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def quickstart_assets(tmp_path_factory):
    """``make(dest)``: the quickstart's synthetic assets (examples/quickstart/make_assets.py: tiny Wan VAE
    and text encoder, videos, model/data JSONs) in ``dest``, as make_assets.py writes them there. They are
    made once a session and copied, the paths in the JSON and list files rewritten to ``dest``; each
    fixture that uses them gets its own copy to change."""
    pristine = tmp_path_factory.mktemp("quickstart_assets")
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "examples/quickstart/make_assets.py", str(pristine)], cwd=REPO, check=True,
                   capture_output=True, env=env)

    def make(dest: Path) -> Path:
        shutil.copytree(pristine, dest, dirs_exist_ok=True)
        for path in dest.rglob("*"):
            if path.suffix in (".json", ".txt") and path.is_file():
                text = path.read_text()
                if str(pristine) in text:
                    path.write_text(text.replace(str(pristine), str(dest)))
        return dest

    return make
