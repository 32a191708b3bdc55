"""A layout's activation memory and time per iteration from a calibration (``calibrate.py``) and the
cluster's communication model (``comm.py``).

Measured on one rank with the whole sequence, the figures are carried to a layout as follows (each a
model, not a measurement, until a multi-rank run checks it; docs/scaling.md keeps the comparison):

- tokens: a micro-batch's video tokens (times micro-batch size over the calibration's) divided by CP;
  a layer's activation bytes and time are the calibrated fits at that token count, divided by TP
  (sequence parallelism splits the saved activations, the layer's matmuls and attention heads split),
  except the time fit's quadratic term (attention), which pairs the rank's queries with the keys of the
  whole sequence: c2 x local x tokens (Ulysses: all tokens, 1 / CP of the heads; ring: 1 / CP of the
  queries against every key; either way 1 / CP of the products);
- activations held on pipeline stage s: 1F1B keeps min(PP - s, micro-batches) micro-batches' layers in
  flight; the interleaved schedule min(2 (PP - s - 1) + (VPP - 1) PP + 1, micro-batches x VPP) chunk
  forwards of the stage's layers / VPP each (megatron-core's warm-up counts, plus the one in progress);
  plus the calibrated rest (embeddings, head, the last layer's backward transients), once;
- time: a micro-batch on stage s takes its layers' and the rest's compute plus the exposed TP and CP
  communication of its layers and its PP p2p (``comm``); the slowest stage sets the pace, and the
  iteration is (micro-batches + (PP - 1) / VPP) such steps (the second term the pipeline bubble) plus
  the exposed DP reduction (``comm.dp_seconds``, the slowest stage's) plus the optimizer step, once:
  the calibrated step over the stage's layers / TP, / (DP x CP) under the distributed optimizer (each
  rank updates its shard); counted in the compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mm.models.predictor.pipeline import layer_layout, stage_span
from mm.plan.calibrate import Calibration, evaluate
from mm.plan.comm import Cluster, Shape, dp_seconds, layer_comm, pp_seconds
from mm.plan.memory import StaticMemory
from mm.training.pretrain import ddp_config_for


@dataclass(frozen=True)
class Estimate:
    """One iteration of a layout on its slowest pipeline stage (seconds) and each stage's activations."""

    activation_bytes: list[float] | None  # per pipeline stage (None: the calibration has no memory)
    compute_seconds: float                # the micro-batches' compute, no bubble
    bubble_seconds: float                 # (PP - 1) / VPP steps of the slowest stage, its communication included
    tp_seconds: float = 0.0               # exposed communication, all micro-batches
    cp_seconds: float = 0.0
    pp_seconds: float = 0.0
    dp_seconds: float = 0.0

    @property
    def comm_seconds(self) -> float:
        return self.tp_seconds + self.cp_seconds + self.pp_seconds + self.dp_seconds

    @property
    def total_seconds(self) -> float:
        return self.compute_seconds + self.bubble_seconds + self.comm_seconds


def in_flight(stage: int, pp: int, vpp: int | None, micro_batches: int) -> float:
    """Micro-batches of a stage's layers whose activations are held at once (in stage-layer units)."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(pp - stage, micro_batches))
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, micro_batches * vpp)
    return chunks / vpp


def attention_split(coef, local: float, whole: float) -> float:
    """A time fit at a rank's ``local`` tokens of sequences of ``whole`` tokens: the constant and linear
    terms at ``local``, a higher term k at ``local`` x ``whole`` ** (k - 1) (the rank's queries against
    every key)."""
    return sum(c * (local ** k if k < 2 else local * whole ** (k - 1)) for k, c in enumerate(coef))


def micro_batches(config) -> int:
    args, dp = config.args, config.sizes.data_parallel
    return (args.global_batch_size or args.micro_batch_size * dp) // (args.micro_batch_size * dp)


def _buckets(config, grads: float, stage: int) -> int:
    """Gradient buckets of a stage's first chunk (``memory._bucket_size``'s rule: only stage 0 buckets)."""
    ddp = ddp_config_for(config.args)
    if not ddp.overlap_grad_reduce or stage > 0:
        return 1
    dp_cp = config.sizes.data_parallel * config.sizes.context_parallel
    return max(1, math.ceil(grads / 4 / (ddp.bucket_size or max(40_000_000, 1_000_000 * dp_cp))))


def estimate(calibration: Calibration, config, num_layers: int, tokens: int, calibrated_mbs: int,
             hidden: int | None = None, cluster: Cluster | None = None,
             static: list[StaticMemory] | None = None) -> Estimate:
    """The estimate of ``config``'s layout at ``tokens`` video tokens per sample; without ``cluster``
    (then also no ``hidden`` size, no ``static`` memory per stage) communication is left out."""
    sizes, args, pred = config.sizes, config.args, config.model.predictor
    tp, cp, pp, vpp = sizes.tensor_parallel, sizes.context_parallel, sizes.pipeline_parallel, config.virtual_pipeline_size
    micro = micro_batches(config)
    sample = tokens * args.micro_batch_size / calibrated_mbs  # a micro-batch's tokens
    local = sample / cp
    layout = layer_layout(num_layers, pp, vpp, pred.pipeline_num_layers)
    per_stage = [sum(stage_span(layout, s, c)[1] for c in range(len(layout))) for s in range(pp)]
    layer_s, rest_s = attention_split(calibration.layer_seconds, local, tokens) / tp, \
        evaluate(calibration.rest_seconds, local) / tp
    shape = Shape.of(sizes)
    steps = []  # per stage: (compute, tp, cp, pp) of one micro-batch
    for n in per_stage:
        comm = layer_comm(cluster, shape, sample, hidden, layer_s, args, n) if cluster else None
        p2p = pp_seconds(cluster, shape, sample, hidden, vpp) if cluster else 0.0
        steps.append((n * layer_s + rest_s, n * comm.tp if comm else 0.0, n * comm.cp if comm else 0.0, p2p))
    slowest = max(steps, key=sum)
    step_s = sum(slowest)
    ddp = ddp_config_for(args)
    dp = 0.0
    if cluster is not None and static is not None:
        dp = max(dp_seconds(cluster, shape, m.grads, m.params, _buckets(config, m.grads, s),
                            ddp.use_distributed_optimizer, ddp.overlap_grad_reduce, s, step_s)
                 for s, m in enumerate(static))
    shard = tp * (sizes.data_parallel * cp if ddp.use_distributed_optimizer else 1)
    optimizer_s = max(calibration.optimizer_step_seconds(n) for n in per_stage) / shard
    times = dict(compute_seconds=micro * slowest[0] + optimizer_s, bubble_seconds=(pp - 1) / (vpp or 1) * step_s,
                 tp_seconds=micro * slowest[1], cp_seconds=micro * slowest[2], pp_seconds=micro * slowest[3],
                 dp_seconds=dp)
    if calibration.layer_bytes is None:
        return Estimate(None, **times)
    layer_b = evaluate(calibration.layer_bytes, local) / tp
    rest_b = evaluate(calibration.rest_bytes, local) / tp
    held = [in_flight(s, pp, vpp, micro) * n * layer_b + rest_b for s, n in enumerate(per_stage)]
    return Estimate(held, **times)
