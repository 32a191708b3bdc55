"""The tables of docs/scaling.md ("Recommended layouts"): mm-plan's top layout for each model and video
size on 8, 64 and 512 GPUs (1, 8, 64 nodes of 8), with its per-rank memory, predicted seconds per
iteration and MFU, as markdown rows.

    python scripts/scaling_tables.py [--gpu h100] [--wan14b-calibration FILE] [--osp-calibration FILE] \\
        [--stepvideo-calibration FILE] [--worlds 8 64 512]

Each model is planned with the flags its calibration was measured with (eager layers, flash-attention 3,
full recompute of every layer, bf16, micro-batch 1) and a global batch of one sample per GPU. A model
whose calibration file is missing is listed as pending. Wan2.2-A14B trains each of its two experts in a
run of its own, with the DiT of Wan2.1-14B: the Wan2.1-14B calibration applies to it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mm, whichever an installed package names
EXAMPLES = REPO / "examples"
FLAGS = ["--micro-batch-size", "1", "--bf16", "--lr", "1e-5", "--attention-kernel", "flash3",
         "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
# (name, model JSON, data JSON, video, which calibration)
CASES = [
    ("Wan2.1-T2V-1.3B", "wan2.1/1.3b/t2v/pretrain_t2v_model.json", "wan2.1/1.3b/t2v/data.json", "81x480x832",
     "wan13b"),
    ("Wan2.1-T2V-14B", "wan2.1/14b/t2v/pretrain_t2v_model.json", "wan2.1/14b/t2v/data.json", "81x720x1280",
     "wan14b"),
    ("Wan2.2-T2V-A14B (one expert)", "wan2.2/a14b/t2v/pretrain_t2v_high_noise_model.json", "wan2.1/14b/t2v/data.json",
     "81x720x1280", "wan14b"),
    ("Open-Sora-Plan 1.3 T2V", "opensoraplan1.3/t2v/pretrain_t2v_model.json", "opensoraplan1.3/t2v/data.json",
     "93x480x640", "osp"),
    ("Step-Video-T2V 30B", "stepvideo/t2v/pretrain_t2v_model.json", "stepvideo/t2v/data.json", "204x544x992",
     "stepvideo"),
    ("Step-Video-T2V 30B", "stepvideo/t2v/pretrain_t2v_model.json", "stepvideo/t2v/data.json", "136x544x992",
     "stepvideo"),
]
HEADER = ("| model | video | GPUs (nodes x 8) | global batch | recommended layout | model state GiB | activations GiB "
          "| s/iteration: compute + comm (TP/CP/PP/DP) + bubble = total | MFU |")


def top_row(gpu: str, nodes: int, calibration: Path, model: str, data: str, video: str) -> tuple[str, str]:
    """(mm-plan's first row, its header line) for one case."""
    from mm.plan.cli import main

    world = 8 * nodes
    argv = ["--nodes", str(nodes), "--gpus-per-node", "8", "--gpu", gpu, "--top", "1", "--calibration",
            str(calibration), "--video", video, "--", "--mm-model", str(EXAMPLES / model), "--mm-data",
            str(EXAMPLES / data), "--global-batch-size", str(world), *FLAGS]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    rows = [line for line in out.getvalue().splitlines() if line.startswith("TP")]
    if code != 0 or not rows:
        raise RuntimeError(f"mm-plan {' '.join(argv)}: exit {code}\n{err.getvalue()[-2000:]}")
    return rows[0], out.getvalue().splitlines()[0]


def markdown(name: str, video: str, nodes: int, row: str) -> str:
    head, flags = row.split("  --", 1)
    numbers = head.split()[-14:]
    layout = " ".join(head.split()[:-14])
    params, grads, optim, activ, total, left = map(float, numbers[:6])
    compute, tp, cp, pp, dp, bubble, seconds = map(float, numbers[6:13])
    fit = "" if left >= 0 else " (does not fit)"
    edit = f"; model JSON: {flags.split('(model JSON: ')[1].split(')')[0]}" if "(model JSON:" in flags else ""
    return (f"| {name} | {video} | {8 * nodes} ({nodes} x 8) | {8 * nodes} | {layout}{fit}{edit} | "
            f"{params + grads + optim:.1f} | {activ:.1f} | {compute:.2f} + {tp:.2f}/{cp:.2f}/{pp:.2f}/{dp:.2f} + "
            f"{bubble:.2f} = {seconds:.2f} | {numbers[13]} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--wan13b-calibration", type=Path, default=EXAMPLES / "wan2.1/1.3b/t2v/calibration_h100_full.json")
    parser.add_argument("--wan14b-calibration", type=Path, default=EXAMPLES / "wan2.1/14b/t2v/calibration_h100_full.json")
    parser.add_argument("--osp-calibration", type=Path,
                        default=EXAMPLES / "opensoraplan1.3/t2v/calibration_h100_full.json")
    parser.add_argument("--stepvideo-calibration", type=Path,
                        default=EXAMPLES / "stepvideo/t2v/calibration_h100_full.json")
    own = parser.parse_args(argv)
    bad = [w for w in own.worlds if w < 8 or w % 8]
    if bad:
        parser.error(f"--worlds {bad}: whole nodes of 8 GPUs")
    print(HEADER)
    print("| " + " | ".join("---" for _ in HEADER.split("|")[1:-1]) + " |")
    for name, model, data, video, key in CASES:
        calibration = getattr(own, f"{key}_calibration")
        if not calibration.is_file():
            print(f"scaling_tables: {name}: no calibration {calibration}; pending", file=sys.stderr)
            print(f"| {name} | {video} | {', '.join(map(str, own.worlds))} | | pending calibration | | | | |")
            continue
        for world in own.worlds:
            row, header = top_row(own.gpu, world // 8, calibration, model, data, video)
            print(markdown(name, video, world // 8, row), flush=True)
            print(f"scaling_tables: {header}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
