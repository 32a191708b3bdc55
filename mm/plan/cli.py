"""``mm-plan`` (also ``python -m mm.plan``): the layouts a training run can use on a cluster, with the
memory each rank needs for the model's state.

    mm-plan --nodes 8 --gpus-per-node 8 --gpu h100 -- \\
        --mm-model examples/wan2.1/14b/t2v/pretrain_t2v_model.json --mm-data data.json \\
        --micro-batch-size 1 --global-batch-size 64 --bf16 [--recompute-... ...]

Everything after the planner's own flags (or after ``--``) is the training command line without a
layout (no --tensor/pipeline/context-parallel flags): the layouts are added to it one by one and each
is checked as ``pretrain_t2v.py`` checks it before starting. Printed per accepted layout: its flags,
and per rank (the most loaded pipeline stage) the parameters, gradient buffers and optimizer state in
GiB and what the GPU has left for activations. Activation memory and step time are not predicted yet:
the order is by fit, then the fewest model-parallel ranks (TP x CP x PP), then the most memory left.
A PP layout of a model JSON without ``predictor.pipeline_num_layers`` is checked with the even split,
which the row names as the JSON edit to make.

With ``--calibration FILE`` (written by ``mm-plan calibrate``, see ``mm/plan/calibrate.py``) and
``--video FxHxW`` each row also has the activation memory of its most loaded rank and the compute time
of an iteration, from the measured per-layer figures (see docs/scaling.md for what is scaled how);
layouts are then ordered by fit and by that time. Communication time is not in it yet.
"""

from __future__ import annotations

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core/diffusers are imported: their known notices (MM_VERBOSE=1 shows them)

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from mm.arguments import ConfigError, parse_flags
from mm.families import resolve
from mm.plan.layouts import valid_layouts
from mm.plan.calibrate import Calibration, latent_size, parse_video, tokens_of
from mm.plan.estimate import estimate
from mm.plan.memory import GiB, static_memory, stage_parameters

# memory each GPU kind has (MiB, as the driver reports it on one card); --gpu-memory-gib overrides
GPU_MIB = {"h100": 81559, "h200": 143771, "910b": 65536}
CONTEXT_GIB = 0.6  # what the CUDA / CANN context and the allocator's first blocks take before the model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-plan", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPU_MIB), default="h100")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="the memory of one GPU (instead of --gpu's)")
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v")
    p.add_argument("--top", type=int, default=10, help="how many layouts to print (0: all)")
    p.add_argument("--show-refused", action="store_true", help="also list the refused layouts with the reasons")
    p.add_argument("--calibration", type=Path, default=None,
                   help="a file of `mm-plan calibrate`: predict activations and compute time from it")
    p.add_argument("--video", type=parse_video, default=None, metavar="FxHxW",
                   help="the training video size in pixels (frames x height x width), with --calibration")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["calibrate"]:
        from mm.plan.calibrate import main as calibrate

        return calibrate(argv[1:])
    parser = _parser()
    own, training = parser.parse_known_args(argv)
    training = [a for a in training if a != "--"]
    problems = []
    if own.nodes < 1 or own.gpus_per_node < 1:
        problems.append(f"--nodes {own.nodes} --gpus-per-node {own.gpus_per_node}: both must be >= 1")
    if own.gpu_memory_gib is not None and own.gpu_memory_gib <= 0:
        problems.append(f"--gpu-memory-gib {own.gpu_memory_gib}: must be > 0")
    layout_flags = [a for a in training if a.split("=")[0] in (
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
        "--virtual-pipeline-model-parallel-size", "--context-parallel-algo", "--ulysses-degree-in-cp")]
    if (own.calibration is None) != (own.video is None):
        problems.append("--calibration and --video go together (the measured figures, the size to predict for)")
    calibration = Calibration.read_into(own.calibration, problems)
    if layout_flags:
        problems.append(f"{' '.join(layout_flags)}: mm-plan chooses the layout; leave the layout flags out")
    if "--train-iters" not in training:
        training += ["--train-iters", "1"]  # required by the training checks, irrelevant to the layout
    if not problems:
        try:
            args = parse_flags(training, prog="mm-plan")
            from mm.arguments.json_configs import load_json, parse_model_config
            model_problems: list[str] = []
            model = parse_model_config(load_json(args.mm_model, "--mm-model"), args.mm_model, model_problems)
            problems += model_problems
            if calibration is not None and not model_problems:
                problems += [f"{m}: --calibration {own.calibration} was measured with other settings"
                             for m in calibration.mismatches(args, model.predictor)]
        except (ConfigError, SystemExit) as e:
            problems.append(str(e) if str(e) else "the training flags do not parse (see above)")
    if problems:
        for problem in problems:
            print(f"mm-plan: error: {problem}", file=sys.stderr)
        return 2
    world = own.nodes * own.gpus_per_node
    family, arch = resolve(model.predictor)
    tokens = None
    if calibration is not None:
        try:
            tokens = tokens_of(arch, latent_size(family, model, own.video))
        except ValueError as e:
            print(f"mm-plan: error: --video {'x'.join(map(str, own.video))}: {e}", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="mm-plan-"))
    try:
        accepted, refused = valid_layouts(training, world, arch.num_layers, own.task, max_tp=own.gpus_per_node,
                                          workdir=workdir)
        return _report(own, world, accepted, refused, calibration, tokens)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _report(own: argparse.Namespace, world: int, accepted, refused, calibration: Calibration | None = None,
            tokens: int | None = None) -> int:
    if not accepted:
        common = set.intersection(*(set(why) for why in refused.values())) if refused else set()
        for problem in sorted(common):  # the training flags themselves, whatever the layout
            print(f"mm-plan: error: {problem}", file=sys.stderr)
        if common:
            return 2
        print(f"mm-plan: no layout of {world} ranks is accepted; --show-refused lists why", file=sys.stderr)
    capacity = (own.gpu_memory_gib if own.gpu_memory_gib is not None else GPU_MIB[own.gpu] / 1024) - CONTEXT_GIB
    rows, shapes = [], {}
    for layout, config in accepted:
        key = (layout.tp, layout.pp, layout.vpp)  # the parameters per stage do not depend on CP or DP
        if key not in shapes:
            shapes[key] = stage_parameters(config)
        stages = static_memory(config, shapes[key])
        act, seconds = [0.0] * len(stages), None
        if calibration is not None:
            est = estimate(calibration, config, _num_layers(config), tokens, calibration.micro_batch_size)
            act, seconds = est.activation_bytes or act, est.compute_seconds
        worst = max(range(len(stages)), key=lambda i: stages[i].total + act[i])
        memory = stages[worst]
        left = capacity - (memory.total + act[worst]) / GiB
        order = (seconds,) if seconds is not None else (layout.tp * layout.cp * layout.pp, -left)
        rows.append((left < 0, *order, layout, memory, act[worst], seconds, left))
    rows.sort(key=lambda r: r[:-5])
    print(f"mm-plan: {world} ranks ({own.nodes} node(s) x {own.gpus_per_node}), {own.gpu_memory_gib or own.gpu} "
          f"({capacity:.1f} GiB for the run); {len(accepted)} layouts accepted, {len(refused)} refused")
    if calibration is None:
        print("model state per rank (most loaded stage), GiB; activations and step time not predicted "
              "(--calibration, --video)")
    else:
        print(f"per rank (most loaded stage), GiB; activations and compute time (no communication) from "
              f"{own.calibration} ({calibration.device}) at {tokens} tokens per sample")
    extra = f" {'activ':>7} {'s/it':>8}" if calibration is not None else ""
    print(f"{'layout':40} {'params':>7} {'grads':>7} {'optim':>7}{extra} {'total':>7} {'left':>7}  flags")
    for *_, layout, memory, act, seconds, left in rows[: own.top or None]:
        more = f" {act / GiB:7.2f} {seconds:8.3f}" if calibration is not None else ""
        print(f"{layout.describe():40} {memory.params / GiB:7.2f} {memory.grads / GiB:7.2f} "
              f"{memory.optimizer / GiB:7.2f}{more} {(memory.total + act) / GiB:7.2f} {left:7.2f}  "
              f"{' '.join(layout.flags())}"
              + (f"  (model JSON: {layout.model_edit()})" if layout.model_edit() else "")
              + ("  (does not fit)" if left < 0 else ""))
    if own.show_refused:
        for layout, why in refused.items():
            print(f"refused {layout.describe()}: {'; '.join(why)}")
    return 0 if accepted else 1


def _num_layers(config) -> int:
    return resolve(config.model.predictor)[1].num_layers


if __name__ == "__main__":
    raise SystemExit(main())
