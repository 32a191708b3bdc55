"""GPU-only tests (marked ``gpu``, skipped without CUDA); what several of them share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mm.accelerator.attention_kernels import kernels_for

REPO = Path(__file__).resolve().parents[2]

# the fused attention kernels a GPU test runs with: cuDNN's always, flash-attention 3 where it can run
GPU_KERNELS = ["cudnn", pytest.param("flash3", marks=pytest.mark.skipif(
    "flash3" not in kernels_for("cuda"), reason="flash-attention 3 is not installed"))]


def run_script(code: str, *args: str, timeout: int = 600) -> str:
    """Run ``code`` in a fresh interpreter from the repository root (a clean CUDA context per test);
    it must exit 0 and print ``ok``. Returns its standard output."""
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout
