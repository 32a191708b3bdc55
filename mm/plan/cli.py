"""``mm-plan`` (also ``python -m mm.plan``): the layouts a training run can use on a cluster, with the
memory each rank needs and, from a calibration, the time of an iteration and its MFU.

    mm-plan --nodes 8 --gpus-per-node 8 --gpu h100 -- \\
        --mm-model examples/wan2.1/14b/t2v/pretrain_t2v_model.json --mm-data data.json \\
        --micro-batch-size 1 --global-batch-size 64 --bf16 [--recompute-... ...]

Everything after the planner's own flags (or after ``--``) is the training command line without a
layout (no --tensor/pipeline/context-parallel flags): the layouts are added to it one by one and each
is checked as ``pretrain_t2v.py`` checks it before starting, except for the files it names (data,
weights, tokenizers: a plan needs none of them). Printed per accepted layout: its flags, and per rank
(the most loaded pipeline stage) the parameters, gradient buffers and optimizer state in GiB and what
the GPU has left for activations. Without a calibration the order is by fit, then the fewest
model-parallel ranks (TP x CP x PP), then the most memory left. A PP layout of a model JSON without
``predictor.pipeline_num_layers`` is checked with the even split, which the row names as the JSON edit
to make.

With ``--calibration FILE`` (written by ``mm-plan calibrate``, see ``mm/plan/calibrate.py``) and
``--video FxHxW`` each row also has the activation memory of its most loaded rank and the time of an
iteration: compute from the measured per-layer figures (``mm.plan.estimate``), the exposed TP, CP, PP
and DP communication from the interconnect (``mm.plan.comm``: defaults per ``--gpu``, overridable),
the pipeline bubble, their total, and the MFU (the model FLOPs of the iteration, the family's own
count, over world size x ``--peak-tflops`` x that time). Layouts are then ordered by fit, then by the
predicted time (docs/scaling.md, "Communication model").
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
from mm.plan.calibrate import text_lengths
from mm.plan.comm import GPU_KINDS, Cluster, Link
from mm.plan.estimate import estimate, micro_batches
from mm.plan.memory import GiB, static_memory, stage_parameters

CONTEXT_GIB = 0.6  # what the CUDA / CANN context and the allocator's first blocks take before the model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-plan", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", type=str.lower,
                   help=f"the GPU kind, for its memory, bf16 peak and interconnect: {', '.join(GPU_KINDS)}; another "
                        "name needs the figures below (see mm/plan/comm.py for the defaults)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="the memory of one GPU (instead of --gpu's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one GPU in TFLOP/s (the MFU's)")
    for where, what in (("intra", "inside a node"), ("inter", "between nodes")):
        p.add_argument(f"--{where}-node-gb-per-s", type=float, default=None,
                       help=f"usable bandwidth per GPU and direction {what}, GB/s")
        p.add_argument(f"--{where}-node-latency-us", type=float, default=None,
                       help=f"latency of one message step {what}, microseconds")
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
    problems += _cluster_problems(own)
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
    latent = None
    if calibration is not None:
        try:
            latent = latent_size(family, model, own.video)
        except ValueError as e:
            print(f"mm-plan: error: --video {'x'.join(map(str, own.video))}: {e}", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="mm-plan-"))
    try:
        accepted, refused = valid_layouts(training, world, arch.num_layers, own.task, max_tp=own.gpus_per_node,
                                          workdir=workdir)
        return _report(own, world, accepted, refused, calibration, latent)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _cluster_problems(own: argparse.Namespace) -> list[str]:
    """The cluster flags' problems: figures out of range, those an unknown --gpu needs."""
    problems = []
    for flag in ("gpu_memory_gib", "peak_tflops", "intra_node_gb_per_s", "inter_node_gb_per_s"):
        value = getattr(own, flag)
        if value is not None and not value > 0:
            problems.append(f"--{flag.replace('_', '-')} {value}: must be > 0")
    for flag in ("intra_node_latency_us", "inter_node_latency_us"):
        value = getattr(own, flag)
        if value is not None and not value >= 0:
            problems.append(f"--{flag.replace('_', '-')} {value}: must be >= 0")
    if own.gpu not in GPU_KINDS:
        needed = ["gpu_memory_gib"] + (["peak_tflops", "intra_node_gb_per_s", "inter_node_gb_per_s",
                                        "intra_node_latency_us", "inter_node_latency_us"]
                                       if own.calibration is not None else [])
        missing = [f"--{flag.replace('_', '-')}" for flag in needed if getattr(own, flag) is None]
        if missing:
            problems.append(f"--gpu {own.gpu}: not a kind mm-plan knows ({', '.join(GPU_KINDS)}); give its figures: "
                            f"{', '.join(missing)}")
    return problems


def cluster_of(own: argparse.Namespace) -> Cluster:
    """The cluster of the flags: ``--gpu``'s figures, each overridden by its flag."""
    kind = GPU_KINDS.get(own.gpu)

    def link(where: str) -> Link:
        default = getattr(kind, where) if kind is not None else None
        gb, us = getattr(own, f"{where}_node_gb_per_s"), getattr(own, f"{where}_node_latency_us")
        return Link(default.gb_per_s if gb is None else gb, default.latency_us if us is None else us)

    return Cluster(own.nodes, own.gpus_per_node, link("intra"), link("inter"),
                   kind.peak_tflops if own.peak_tflops is None else own.peak_tflops)


def _report(own: argparse.Namespace, world: int, accepted, refused, calibration: Calibration | None = None,
            latent: tuple[int, int, int] | None = None) -> int:
    if not accepted:
        common = set.intersection(*(set(why) for why in refused.values())) if refused else set()
        for problem in sorted(common):  # the training flags themselves, whatever the layout
            print(f"mm-plan: error: {problem}", file=sys.stderr)
        if common:
            return 2
        print(f"mm-plan: no layout of {world} ranks is accepted; --show-refused lists why", file=sys.stderr)
    kind = GPU_KINDS.get(own.gpu)
    capacity = (own.gpu_memory_gib if own.gpu_memory_gib is not None else kind.memory_mib / 1024) - CONTEXT_GIB
    cluster = cluster_of(own) if calibration is not None else None
    tokens, flops = None, None
    if calibration is not None and accepted:
        config = accepted[0][1]
        family, arch = resolve(config.model.predictor)
        tokens = tokens_of(arch, latent)
        # model FLOPs of one micro-batch, the family's count (as the training log's throughput)
        flops = family.recipe(config.args, config, arch).flops(latent, text_lengths(family, arch, config.data),
                                                               config.args.micro_batch_size)
    rows, shapes = [], {}
    for layout, config in accepted:
        key = (layout.tp, layout.pp, layout.vpp)  # the parameters per stage do not depend on CP or DP
        if key not in shapes:
            shapes[key] = stage_parameters(config)
        stages = static_memory(config, shapes[key])
        act, est, mfu = [0.0] * len(stages), None, None
        if calibration is not None:
            arch = resolve(config.model.predictor)[1]
            est = estimate(calibration, config, arch.num_layers, tokens, calibration.micro_batch_size,
                           arch.hidden_size, cluster, stages)
            act = est.activation_bytes or act
            samples = micro_batches(config) * config.sizes.data_parallel  # per iteration, in micro-batches
            mfu = flops * samples / (world * cluster.peak_tflops * 1e12 * est.total_seconds)
        worst = max(range(len(stages)), key=lambda i: stages[i].total + act[i])
        memory = stages[worst]
        left = capacity - (memory.total + act[worst]) / GiB
        order = (est.total_seconds,) if est is not None else (layout.tp * layout.cp * layout.pp, -left)
        rows.append((left < 0, *order, layout, memory, act[worst], est, mfu, left))
    rows.sort(key=lambda r: r[:-6])
    print(f"mm-plan: {world} ranks ({own.nodes} node(s) x {own.gpus_per_node}), {own.gpu} "
          f"({capacity:.1f} GiB for the run); {len(accepted)} layouts accepted, {len(refused)} refused")
    if calibration is None:
        print("model state per rank (most loaded stage), GiB; activations and step time not predicted "
              "(--calibration, --video)")
    else:
        print(f"per rank (most loaded stage), GiB; activations and compute from {own.calibration} "
              f"({calibration.device}) at {tokens} tokens per sample; seconds per iteration: compute, exposed "
              f"communication (TP, CP, PP, DP), pipeline bubble, total; MFU at {cluster.peak_tflops:g} TFLOP/s "
              f"per GPU; links {cluster.intra.gb_per_s:g} GB/s {cluster.intra.latency_us:g} us inside a node, "
              f"{cluster.inter.gb_per_s:g} GB/s {cluster.inter.latency_us:g} us between nodes")
    extra = f" {'activ':>7}" if calibration is not None else ""
    times = "".join(f" {name:>8}" for name in ("compute", "tp", "cp", "pp", "dp", "bubble", "s/it")) + \
        f" {'MFU':>6}" if calibration is not None else ""
    print(f"{'layout':40} {'params':>7} {'grads':>7} {'optim':>7}{extra} {'total':>7} {'left':>7}{times}  flags")
    for *_, layout, memory, act, est, mfu, left in rows[: own.top or None]:
        more = f" {act / GiB:7.2f}" if est is not None else ""
        seconds = "".join(f" {t:8.3f}" for t in (est.compute_seconds, est.tp_seconds, est.cp_seconds,
                                                   est.pp_seconds, est.dp_seconds, est.bubble_seconds,
                                                   est.total_seconds)) + f" {100 * mfu:5.1f}%" if est else ""
        print(f"{layout.describe():40} {memory.params / GiB:7.2f} {memory.grads / GiB:7.2f} "
              f"{memory.optimizer / GiB:7.2f}{more} {(memory.total + act) / GiB:7.2f} {left:7.2f}{seconds}  "
              f"{' '.join(layout.flags())}"
              + (f"  (model JSON: {layout.model_edit()})" if layout.model_edit() else "")
              + ("  (does not fit)" if left < 0 else ""))
    if own.show_refused:
        for layout, why in refused.items():
            print(f"refused {layout.describe()}: {'; '.join(why)}")
    return 0 if accepted else 1


if __name__ == "__main__":
    raise SystemExit(main())
