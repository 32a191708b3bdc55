"""Test-session set-up: GPU tests are skipped where torch sees no CUDA GPU."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the accelerator machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
