"""``mm-plan calibrate``: measured per-layer step time and activation memory of a model on the local
accelerator, the figures ``mm-plan --calibration`` predicts from.

    mm-plan calibrate --videos 33x480x832 81x480x832 --output calibration.json -- \\
        --mm-model examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json --mm-data data.json \\
        --micro-batch-size 1 --bf16 --lr 1e-5 --compile-dit-blocks \\
        --recompute-granularity selective --recompute-modules layernorm --attention-kernel flash3

For each video size (frames x height x width in pixels; the model JSON's VAE section gives the latent
size) and for the DiT with 1 and with 3 layers, one process runs the training iteration
``pretrain_t2v.py`` runs (the same ``Trainer``: megatron-core's schedule, DDP, the optimizer, the
flags' recompute, compilation and attention kernel) on random latents and text embeddings of the
DiT's widths, one micro-batch per iteration. Per point: the median seconds per iteration, of which
the optimizer step's (timed apart: a layout pays it once per iteration, on its share of the
parameters, where the rest is paid per micro-batch), the bytes the device holds between iterations
(parameters, gradient buffers, optimizer state) and the peak above that during an iteration
(activations, the backward's transients). The difference of the two layer counts, halved, is one
layer's; the 1-layer figure less one layer is the rest (embeddings, head, loss). The optimizer step
is fitted on the layer count alone (its work is the parameters'). Memory is measured on GPUs/NPUs only
(the CPU has no allocator statistics).

The JSON holds the points, the settings they were measured with (mm-plan refuses to apply them to a
run with other recompute / compile / kernel settings) and the fits ``Calibration`` evaluates: bytes
linear in the tokens, seconds quadratic (attention) in the tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

FORMAT = 1
LAYER_COUNTS = (1, 3)
# the training flags whose values change per-layer time or memory: a calibration applies only to a
# run with the same ones
SETTINGS = ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
            "compile_dit_blocks", "attention_kernel", "bf16", "fp16")


def parse_video(text: str) -> tuple[int, int, int]:
    """``FRAMESxHEIGHTxWIDTH`` (pixels) -> the three ints."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 81x480x832")
    return tuple(int(p) for p in parts)


def latent_size(family, model, video: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latent (frames, height, width) of a video size under the model JSON's VAE; ValueError
    naming the rule when the VAE cannot take it."""
    frames, height, width = video
    spatial, temporal = family.planning_vae_factors(model)  # without the VAE's files where the JSON tells
    rule = family.frames(model.ae, temporal)
    latent_frames = rule.latent_frames(frames)
    if latent_frames is None:
        raise ValueError(f"{frames} frames: the VAE takes {rule.valid()}")
    if height % spatial or width % spatial:
        raise ValueError(f"{height}x{width}: height and width must be multiples of the VAE's spatial factor {spatial}")
    return latent_frames, height // spatial, width // spatial


def tokens_of(arch, latent: tuple[int, int, int]) -> int:
    """Video tokens of one sample: the latent size over the DiT's (t, h, w) patch."""
    pt, ph, pw = arch.patch_size
    return (latent[0] // pt) * (latent[1] // ph) * (latent[2] // pw)


def text_lengths(family, arch, data) -> list[int]:
    """The token lengths the training loop pads each text encoder's prompts to (the data JSON's
    tokenizers, else the family's defaults)."""
    _, widths = arch.text_to_video_inputs()
    lens = [int(tokenizer.get("model_max_length", family.text_max_length(i)))
            for i, tokenizer in enumerate(data.tokenizers if data is not None else [])]
    return lens + [family.text_max_length(i) for i in range(len(lens), len(widths))]


# ---------------------------------------------------------------------------------------------- fits

def fit_polynomial(xs: Sequence[float], ys: Sequence[float], degree: int) -> list[float]:
    """Least-squares coefficients ``[c0, c1, ...]`` of ``y = c0 + c1 x + ...``, the degree lowered to
    what the points determine (one point: a constant per token through the origin)."""
    degree = min(degree, len(xs) - 1)
    if degree < 1:
        return [0.0, ys[0] / xs[0]]
    x = torch.tensor(xs, dtype=torch.float64)
    a = torch.stack([x ** k for k in range(degree + 1)], dim=1)
    coef = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    return coef.tolist()


def evaluate(coef: Sequence[float], x: float) -> float:
    return sum(c * x ** k for k, c in enumerate(coef))


@dataclass(frozen=True)
class Calibration:
    """A calibration file's fits: per layer and for the rest, in tokens of one micro-batch on one rank."""

    settings: dict
    device: str
    micro_batch_size: int
    model: dict       # model_id, the predictor's architecture keys, num_heads
    layer_seconds: list[float]
    rest_seconds: list[float]
    layer_bytes: list[float] | None   # None: measured where the device reports no memory (CPU)
    rest_bytes: list[float] | None
    points: list[dict]
    # [the rest's, one layer's] seconds of the optimizer step, once per iteration on the whole model's
    # parameters; None in a calibration that timed it inside rest_seconds (per micro-batch)
    optimizer_seconds: list[float] | None = None

    @classmethod
    def read(cls, path: str | Path) -> "Calibration":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--calibration {path}: {e}") from None
        if data.get("format") != FORMAT:
            raise ValueError(f"--calibration {path}: format {data.get('format')!r}; this mm reads format {FORMAT} "
                             "(run mm-plan calibrate again)")
        try:
            return cls(settings=data["settings"], device=data["device"], micro_batch_size=data["micro_batch_size"],
                       model=data["model"], points=data["points"], **data["fits"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"--calibration {path}: not a calibration file of mm-plan calibrate ({e!r})") from None

    @classmethod
    def read_into(cls, path: str | Path | None, problems: list[str]) -> "Calibration | None":
        """``read``, a problem appended instead of raised; None without a path."""
        if path is None:
            return None
        try:
            return cls.read(path)
        except ValueError as e:
            problems.append(str(e))
            return None

    def mismatches(self, args: argparse.Namespace, predictor=None) -> list[str]:
        """The settings of the training flags ``args`` (and the architecture of the model JSON's
        ``predictor`` section) that differ from the calibration's."""
        out = []
        if predictor is not None:
            mine = _architecture(predictor)
            if mine != self.model:
                keys = sorted(k for k in set(mine["predictor"]) | set(self.model.get("predictor", {}))
                              if mine["predictor"].get(k) != self.model.get("predictor", {}).get(k))
                keys += [k for k in ("model_id", "num_heads") if mine[k] != self.model.get(k)]
                out.append(f"the model JSON's predictor ({', '.join(f'{k}' for k in keys)} differ)")
        for key in SETTINGS:
            given = getattr(args, key, None)
            given = list(given) if isinstance(given, (list, tuple)) else given
            if given != self.settings.get(key):
                out.append(f"--{key.replace('_', '-')} {given!r} (calibrated with {self.settings.get(key)!r})")
        return out

    def step_seconds(self, layers: int, tokens: float) -> float:
        """One micro-batch per iteration, optimizer step included."""
        return layers * evaluate(self.layer_seconds, tokens) + evaluate(self.rest_seconds, tokens) \
            + self.optimizer_step_seconds(layers)

    def optimizer_step_seconds(self, layers: float) -> float:
        """The optimizer step over the parameters of ``layers`` layers and the rest (0 where the calibration
        counted it in the rest)."""
        if self.optimizer_seconds is None:
            return 0.0
        rest, layer = self.optimizer_seconds
        return max(0.0, rest + layers * layer)

    def activation_bytes(self, layers: int, tokens: float) -> float | None:
        """Peak bytes above the model state of one iteration with ``layers`` layers."""
        if self.layer_bytes is None:
            return None
        return layers * evaluate(self.layer_bytes, tokens) + evaluate(self.rest_bytes, tokens)


def _architecture(predictor) -> dict:
    """What a calibration's layers were: the predictor's model_id, architecture keys and heads (the
    layer count, pipeline split, weights and dtype aside)."""
    params = {k: v for k, v in predictor.params.items() if k not in ("from_pretrained", "pipeline_num_layers", "dtype")}
    return json.loads(json.dumps({"model_id": predictor.model_id, "predictor": params,
                                  "num_heads": predictor.num_heads}))


def fits_of(points: list[dict]) -> dict:
    """The per-layer and rest fits of the measured points (each with ``layers`` 1 and 3 per size)."""
    by_tokens: dict[int, dict[int, dict]] = {}
    for p in points:
        by_tokens.setdefault(p["tokens"], {})[p["layers"]] = p
    lo, hi = LAYER_COUNTS
    split = all(p.get("optimizer_seconds") is not None for p in points)
    rows, optimizer = [], []
    for tokens, per in sorted(by_tokens.items()):
        if lo not in per or hi not in per:
            continue
        # without the optimizer step (timed apart) where the points have it
        sec = {n: per[n]["seconds"] - (per[n]["optimizer_seconds"] if split else 0.0) for n in (lo, hi)}
        layer_s = (sec[hi] - sec[lo]) / (hi - lo)
        rest_s = sec[lo] - lo * layer_s
        if split:
            opt_layer = (per[hi]["optimizer_seconds"] - per[lo]["optimizer_seconds"]) / (hi - lo)
            optimizer.append((per[lo]["optimizer_seconds"] - lo * opt_layer, opt_layer))
        if per[lo]["peak_bytes"] is None:
            layer_b = rest_b = None
        else:
            layer_b = (per[hi]["peak_bytes"] - per[lo]["peak_bytes"]) / (hi - lo)
            rest_b = per[lo]["peak_bytes"] - lo * layer_b
        rows.append((tokens, layer_s, rest_s, layer_b, rest_b))
    if not rows:
        raise ValueError("no video size was measured with both layer counts")
    tokens = [r[0] for r in rows]
    measured_memory = rows[0][3] is not None
    return {"layer_seconds": fit_polynomial(tokens, [r[1] for r in rows], 2),
            "rest_seconds": fit_polynomial(tokens, [r[2] for r in rows], 1),
            "layer_bytes": fit_polynomial(tokens, [r[3] for r in rows], 1) if measured_memory else None,
            "rest_bytes": fit_polynomial(tokens, [r[4] for r in rows], 1) if measured_memory else None,
            # the same work at every size: the sizes' mean
            "optimizer_seconds": [statistics.fmean(o[i] for o in optimizer) for i in (0, 1)] if split else None}


# ------------------------------------------------------------------------------------- measuring

def _model_json_with_layers(path: str, layers: int, workdir: Path) -> str:
    from mm.arguments.json_configs import load_json

    model = load_json(path, "--mm-model")
    model["predictor"]["num_layers"] = layers
    model["predictor"]["from_pretrained"] = None  # random weights: the time and memory are the same
    model["predictor"].pop("pipeline_num_layers", None)
    out = workdir / f"model_{layers}_layers.json"
    out.write_text(json.dumps(model, indent=1))
    return str(out)


def _with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return [*out, flag, value]


def measure(training: list[str], videos: list[tuple[int, int, int]], repeats: int = 3, warmups: int = 2,
            log=print, layer_counts: Sequence[int | None] = LAYER_COUNTS) -> dict:
    """Run the points in this process (a world of one) and return the calibration file's content
    (``layer_counts`` None: the model JSON's own layers, with no fits)."""
    from mm.accelerator import destroy_distributed
    from mm.families import family_for
    from mm.runtime import configure, start
    from mm.training.checks import check_task
    from mm.training.pretrain import Trainer

    training = list(training)
    mbs = training[training.index("--micro-batch-size") + 1] if "--micro-batch-size" in training else "1"
    training = _with_flag(training, "--global-batch-size", mbs)  # one micro-batch per iteration
    training = _with_flag(training, "--train-iters", str(warmups + repeats))
    for flag in ("--save", "--load", "--tensorboard-dir", "--wandb-project"):
        if flag in training:
            raise ValueError(f"{flag}: calibration saves and loads nothing; leave it out")
    model_path = training[training.index("--mm-model") + 1] if "--mm-model" in training else None
    if model_path is None:
        raise ValueError("--mm-model: the training flags must name the model JSON")
    config, _, launch = configure(training, "train", prog="mm-plan calibrate")
    if launch.world_size != 1:
        raise ValueError(f"mm-plan calibrate runs in one process (WORLD_SIZE is {launch.world_size}): "
                         "run it with python, not torchrun")
    family = family_for(config.model.predictor.model_id)
    arch = family.arch(config.model.predictor)
    # each size its own static graph, as a run at one size compiles it (not one dynamic-shape graph)
    torch._dynamo.config.automatic_dynamic_shapes = False
    latents = [latent_size(family, config.model, v) for v in videos]
    channels, widths = arch.text_to_video_inputs()
    text_lens = text_lengths(family, arch, config.data)

    points, device_name, runtime = [], None, None
    with tempfile.TemporaryDirectory(prefix="mm-plan-calibrate-") as tmp:
        for layers in layer_counts:
            layers = layers or arch.num_layers
            argv = _with_flag(training, "--mm-model", _model_json_with_layers(model_path, layers, Path(tmp)))
            if runtime is None:
                runtime = start(argv, mode="train", prog="mm-plan calibrate",
                                check=lambda c: check_task("t2v", c, files=False, weights=False))
                acc = runtime.accelerator
                device_name = acc.device_name()
            else:
                runtime.config, _, _ = configure(argv, "train", prog="mm-plan calibrate")
            for video, latent in zip(videos, latents):
                point = _measure_point(Trainer, runtime, latent, channels, widths, text_lens, warmups, repeats)
                point.update(video=list(video), latent=list(latent), tokens=tokens_of(arch, latent), layers=layers)
                log(f"mm-plan calibrate: {layers} layer(s), video {'x'.join(map(str, video))} "
                    f"({point['tokens']} tokens): {point['seconds']:.4f} s/iteration"
                    + ("" if point["peak_bytes"] is None else
                       f", model state {point['static_bytes'] / 2**30:.3f} GiB, peak above it "
                       f"{point['peak_bytes'] / 2**30:.3f} GiB"))
                points.append(point)
    destroy_distributed()
    args = config.args
    settings = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k in SETTINGS
                for v in [getattr(args, k, None)]}
    return {"format": FORMAT, "device": device_name, "model": _architecture(config.model.predictor),
            "micro_batch_size": int(mbs), "settings": settings, "points": points,
            "fits": fits_of(points) if tuple(layer_counts) == LAYER_COUNTS else None}


def check(calibration: Calibration, measured: dict) -> list[str]:
    """Lines of predicted vs measured for the whole model's points of ``measured``."""
    lines = ["| video | tokens | layers | activations predicted GiB | measured GiB | error | s/iteration predicted "
             "| measured | error |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in measured["points"]:
        seconds = calibration.step_seconds(p["layers"], p["tokens"])
        act = calibration.activation_bytes(p["layers"], p["tokens"])
        mem = ("- | - | -" if act is None or p["peak_bytes"] is None else
               f"{act / 2**30:.2f} | {p['peak_bytes'] / 2**30:.2f} | {100 * (act / p['peak_bytes'] - 1):+.1f}%")
        lines.append(f"| {'x'.join(map(str, p['video']))} | {p['tokens']} | {p['layers']} | {mem} | {seconds:.3f} | "
                     f"{p['seconds']:.3f} | {100 * (seconds / p['seconds'] - 1):+.1f}% |")
    return lines


def _measure_point(trainer_cls, runtime, latent, channels, widths, text_lens, warmups: int, repeats: int) -> dict:
    acc = runtime.accelerator
    device = acc.device()

    class SyntheticTrainer(trainer_cls):
        """The training loop's iteration on random encoder outputs (no data, no encoders)."""

        def _batches(self, consumed: int):
            mbs = self.args.micro_batch_size
            gen = torch.Generator(device="cpu").manual_seed(0)
            latents = torch.randn(mbs, channels, *latent, generator=gen).to(device, self.dtype)
            context = [torch.randn(mbs, n, w, generator=gen).to(device, self.dtype) for n, w in zip(text_lens, widths)]
            masks = [torch.ones(mbs, n, dtype=torch.long, device=device) for n in text_lens]
            while True:
                yield {"latents": latents, "context": context, "context_mask": masks, "skipped": [],
                       "condition": None, "context_image": None}

    from megatron.core.pipeline_parallel import get_forward_backward_func

    trainer = SyntheticTrainer(runtime, "t2v")
    forward_backward = get_forward_backward_func()
    step, optimizer_times = trainer.optimizer.step, []

    def timed_step(*args, **kwargs):
        acc.synchronize()
        begin = time.perf_counter()
        out = step(*args, **kwargs)
        acc.synchronize()
        optimizer_times.append(time.perf_counter() - begin)
        return out

    trainer.optimizer.step = timed_step
    try:
        times = []
        for i in range(warmups + repeats):
            trainer.iteration = i + 1
            if i == warmups:
                acc.synchronize()
                static = acc.memory_allocated()
                acc.reset_peak_memory_stats()
            acc.synchronize()
            begin = time.perf_counter()
            trainer.train_step(forward_backward)
            acc.synchronize()
            if i >= warmups:
                times.append(time.perf_counter() - begin)
        peak = acc.max_memory_allocated()
        return {"seconds": statistics.median(times), "optimizer_seconds": statistics.median(optimizer_times[warmups:]),
                "static_bytes": None if acc.is_cpu else static,
                "peak_bytes": None if acc.is_cpu else peak - static}
    finally:
        # the timing wrapper references the optimizer that holds it: undo it, so that the model state is
        # freed here, before the next point measures what the device holds (not at some later collection)
        del trainer.optimizer.step
        trainer = step = timed_step = None
        gc.collect()
        acc.empty_cache()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mm-plan calibrate", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--videos", type=parse_video, nargs="+", required=True, metavar="FxHxW",
                        help="video sizes in pixels (frames x height x width); two or more, three for a time fit "
                             "quadratic in the tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=2, help="iterations before timing (compilation, allocator)")
    parser.add_argument("--output", type=Path, default=None, help="the calibration JSON to write")
    parser.add_argument("--check", type=Path, default=None, metavar="CALIBRATION",
                        help="instead: measure the model with all its layers at --videos and print the figures "
                             "this calibration file predicts beside the measured ones")
    own, training = parser.parse_known_args(argv)
    training = [a for a in training if a != "--"]
    problems = []
    if own.repeats < 1 or own.warmups < 1:
        problems.append(f"--repeats {own.repeats} --warmups {own.warmups}: both must be >= 1")
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size"):
        if any(a.split("=")[0] == flag for a in training):
            problems.append(f"{flag}: calibration measures one rank of the whole model; leave the layout out")
    if (own.output is None) == (own.check is None):
        problems.append("give one of --output (calibrate) and --check (compare a calibration with the whole model)")
    calibration = Calibration.read_into(own.check, problems)
    if problems:
        for p in problems:
            print(f"mm-plan calibrate: error: {p}", file=sys.stderr)
        return 2
    try:
        result = measure(training, own.videos, own.repeats, own.warmups,
                         layer_counts=LAYER_COUNTS if calibration is None else (None,))
    except ValueError as e:
        print(f"mm-plan calibrate: error: {e}", file=sys.stderr)
        return 2
    if calibration is not None:
        print("\n".join(check(calibration, result)))
        return 0
    own.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = own.output.with_name(own.output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(own.output)
    print(f"mm-plan calibrate: wrote {own.output}")
    return 0
