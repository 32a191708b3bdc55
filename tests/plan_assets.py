"""The JSONs mm-plan's tests plan for: the quickstart's model and data JSONs (its synthetic data and
encoders) with a 4-layer DiT (room for PP2 x VPP2) whose widths make megatron's buffer padding show
(64-element parameter starts, bucket ends on multiples of lcm(DP, 128))."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_plan_assets(root: Path) -> Path:
    """``root/model.json``, ``root/data.json`` (and the quickstart's assets they name); returns ``root``."""
    subprocess.run([sys.executable, "examples/quickstart/make_assets.py", str(root)], cwd=REPO, check=True,
                   capture_output=True)
    model = json.loads((root / "model.json").read_text())
    model["predictor"].update(num_layers=4, num_heads=4, hidden_size=96, ffn_dim=200)
    (root / "model.json").write_text(json.dumps(model))
    return root
