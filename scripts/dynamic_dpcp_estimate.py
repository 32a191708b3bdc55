"""mm-plan's estimate of dynamic DP/CP (``use_dynamic_dpcp``) against the static layout, for a dataset of
several video sizes trained in size buckets (each iteration one size, as the bucketed samplers give).

    python scripts/dynamic_dpcp_estimate.py --calibration examples/wan2.1/1.3b/t2v/calibration_h100_compiled_layernorm.json \\
        --mix 81x480x832:0.5 81x720x1280:0.5 [--nodes 1] [--gpu h100] -- TRAINING FLAGS (those of the calibration)

For each size, mm-plan's estimate of every layout dynamic DP/CP can switch between: TP1 PP1, Ulysses CP of
1, 2, 4, ... ranks, the rest DP, a global batch of one sample per GPU. The static layout is the one CP
degree at which every size fits the GPU; dynamic DP/CP runs each size at the smallest degree at which it
fits (what ``max_seq_size`` set to the largest size that fits one rank gives). Prints a markdown table:
per size and for the mix (weighted by the given fractions), seconds per iteration of each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def layouts_of(video: str, nodes: int, gpu: str, calibration: Path, training: list[str]) -> dict[int, tuple[float, bool]]:
    """CP degree -> (predicted seconds per iteration, fits the GPU) of the Ulysses-or-none TP1 PP1 layouts."""
    from mm.plan.cli import main

    world = 8 * nodes
    argv = ["--nodes", str(nodes), "--gpus-per-node", "8", "--gpu", gpu, "--top", "0", "--calibration",
            str(calibration), "--video", video, "--", *training, "--global-batch-size", str(world)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"mm-plan {' '.join(argv)}: exit {code}\n{err.getvalue()[-2000:]}")
    found = {}
    for line in out.getvalue().splitlines():
        if not line.startswith("TP1 "):
            continue
        head = line.split("  --")[0]
        words = head.split()
        numbers = words[-14:]
        layout = " ".join(words[:-14])
        if " PP1 " not in layout or ("(" in layout and "(ulysses)" not in layout):
            continue
        cp = int(layout.split()[1].removeprefix("CP"))
        found[cp] = (float(numbers[12]), float(numbers[5]) >= 0)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--mix", nargs="+", required=True, metavar="FxHxW:FRACTION")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu", default="h100")
    own, training = parser.parse_known_args(argv)
    training = [a for a in training if a != "--"]
    mix = []
    for item in own.mix:
        video, _, share = item.partition(":")
        try:
            mix.append((video, float(share or 1)))
        except ValueError:
            parser.error(f"--mix {item}: expected FxHxW:FRACTION, e.g. 81x480x832:0.5")
    total_share = sum(s for _, s in mix)
    per = {video: layouts_of(video, own.nodes, own.gpu, own.calibration, training) for video, _ in mix}
    degrees = sorted(set.intersection(*(set(p) for p in per.values())))
    static = next((c for c in degrees if all(per[v][c][1] for v, _ in mix)), None)
    if static is None:
        print("dynamic_dpcp_estimate: no CP degree fits every size", file=sys.stderr)
        return 1
    world = 8 * own.nodes
    print(f"| video | share | static: CP{static} DP{world // static} s/iteration | dynamic: layout | s/iteration | "
          "speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    mean_static = mean_dynamic = 0.0
    for video, share in mix:
        cp = next(c for c in degrees if per[video][c][1])
        s, d = per[video][static][0], per[video][cp][0]
        mean_static += share / total_share * s
        mean_dynamic += share / total_share * d
        print(f"| {video} | {share / total_share:.0%} | {s:.2f} | CP{cp} DP{world // cp} | {d:.2f} | {s / d:.2f}x |")
    print(f"| the mix | 100% | {mean_static:.2f} | | {mean_dynamic:.2f} | {mean_static / mean_dynamic:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
