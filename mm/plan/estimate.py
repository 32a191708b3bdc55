"""A layout's activation memory and compute time per iteration from a calibration (``calibrate.py``).

Measured on one rank with the whole sequence, the figures are carried to a layout as follows (each a
model, not a measurement, until a multi-rank run checks it; docs/scaling.md keeps the comparison):

- tokens: a micro-batch's video tokens (times micro-batch size over the calibration's) divided by CP;
  a layer's activation bytes and time are the calibrated fits at that token count, divided by TP
  (sequence parallelism splits the saved activations, the layer's matmuls and attention heads split);
- activations held on pipeline stage s: 1F1B keeps min(PP - s, micro-batches) micro-batches' layers in
  flight; the interleaved schedule min(2 (PP - s - 1) + (VPP - 1) PP + 1, micro-batches x VPP) chunk
  forwards of the stage's layers / VPP each (megatron-core's warm-up counts, plus the one in progress);
  plus the calibrated rest (embeddings, head, the last layer's backward transients), once;
- compute time: (micro-batches + (PP - 1) / VPP) x the slowest stage's time per micro-batch (the
  pipeline bubble), each micro-batch the stage's layers plus the rest. No communication.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm.models.predictor.pipeline import layer_layout, stage_span
from mm.plan.calibrate import Calibration, evaluate


@dataclass(frozen=True)
class Estimate:
    activation_bytes: list[float] | None  # per pipeline stage (None: the calibration has no memory)
    compute_seconds: float                # one iteration, all micro-batches


def in_flight(stage: int, pp: int, vpp: int | None, micro_batches: int) -> float:
    """Micro-batches of a stage's layers whose activations are held at once (in stage-layer units)."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(pp - stage, micro_batches))
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, micro_batches * vpp)
    return chunks / vpp


def estimate(calibration: Calibration, config, num_layers: int, tokens: int, calibrated_mbs: int) -> Estimate:
    sizes, args, pred = config.sizes, config.args, config.model.predictor
    tp, cp, pp, vpp = sizes.tensor_parallel, sizes.context_parallel, sizes.pipeline_parallel, config.virtual_pipeline_size
    micro = (args.global_batch_size or args.micro_batch_size * sizes.data_parallel) // (
        args.micro_batch_size * sizes.data_parallel)
    local = tokens * args.micro_batch_size / calibrated_mbs / cp
    layout = layer_layout(num_layers, pp, vpp, pred.pipeline_num_layers)
    per_stage = [sum(stage_span(layout, s, c)[1] for c in range(len(layout))) for s in range(pp)]
    layer_s, rest_s = evaluate(calibration.layer_seconds, local) / tp, evaluate(calibration.rest_seconds, local) / tp
    stage_s = max(n * layer_s + rest_s for n in per_stage)
    seconds = (micro + (pp - 1) / (vpp or 1)) * stage_s
    if calibration.layer_bytes is None:
        return Estimate(None, seconds)
    layer_b = evaluate(calibration.layer_bytes, local) / tp
    rest_b = evaluate(calibration.rest_bytes, local) / tp
    held = [in_flight(s, pp, vpp, micro) * n * layer_b + rest_b for s, n in enumerate(per_stage)]
    return Estimate(held, seconds)
