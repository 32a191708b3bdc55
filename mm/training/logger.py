"""What the training loop reports each iteration: Megatron-LM's iteration line, TensorBoard and
Weights & Biases scalars, and the policy for a NaN/Inf loss.

The loop calls ``TrainingLogger.log`` once per iteration on every rank. The iteration line, the
TensorBoard events and the W&B run belong to the last rank, as in Megatron-LM
(``print_rank_last``): with pipeline parallelism the loss exists only on the last stage, and with
one stage the last rank holds the same data-parallel-averaged loss as rank 0. The data loader's
bad-sample summary is printed by whichever rank passes one (the training loop passes it on the
first data-parallel reader, summed over every data-parallel rank).

Every ``--log-interval`` iterations (and at the last one) the line gives averages over the
interval, as Megatron-LM does: time per iteration, TFLOP/s per device (``--log-throughput``), and
the loss of the iterations that updated the model; the skipped and NaN counts are those of the
interval. It adds the time the remaining iterations take at the interval's pace ("time to finish").
A run on CPU processes (``on_cpu``) reports its throughput in GFLOP/s per process and no device
memory (there is none to report). TensorBoard (``--tensorboard-dir``) and W&B (``--wandb-project``) get this iteration's
values every ``--tensorboard-log-interval`` iterations, with Megatron-LM's scalar names.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

import torch
import torch.distributed as dist

from mm.training.flops import tflops_per_device

OK, SKIP = "ok", "skip"


def check_loss(loss: float | torch.Tensor | None, exit_on_nan: bool, iteration: int | None = None,
               device: torch.device | str | None = None) -> str:
    """The NaN/Inf policy: ``"ok"`` for a finite loss, ``"skip"`` for NaN/Inf (the loop then makes no
    update and counts the iteration), or, with ``exit_on_nan`` (--exit-on-nan-loss), SystemExit.

    ``loss`` is None on ranks that hold no loss (pipeline stages before the last). With ``device``
    every rank must call this, and all get the same answer: the ranks' verdicts are combined by an
    all-reduce on that device, so every rank skips the optimizer step together (it has collectives).
    """
    bad = loss is not None and not math.isfinite(float(loss))
    if device is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = flag.item() > 0
    if not bad:
        return OK
    where = f" at iteration {iteration}" if iteration is not None else ""
    if exit_on_nan:
        raise SystemExit(f"pretrain: the loss is NaN/Inf{where}; stopping because of --exit-on-nan-loss (without "
                         "that flag the iteration is skipped, with no update, and counted in the log)")
    return SKIP


@dataclass(frozen=True)
class LogConfig:
    """The logging flags (see mm/arguments/flags.py)."""

    log_interval: int = 100
    log_throughput: bool = False
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None

    @classmethod
    def from_args(cls, args) -> "LogConfig":
        return cls(log_interval=args.log_interval, log_throughput=args.log_throughput,
                   tensorboard_dir=args.tensorboard_dir, tensorboard_log_interval=args.tensorboard_log_interval,
                   wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
                   wandb_save_dir=args.wandb_save_dir)


def require_logging_packages(config: LogConfig) -> None:
    """SystemExit naming the flag when --tensorboard-dir or --wandb-project asks for a package that is
    not installed. ``TrainingLogger`` calls it on every rank, so all ranks stop together."""
    missing = []
    if config.tensorboard_dir is not None and importlib.util.find_spec("tensorboard") is None:
        missing.append(f"--tensorboard-dir {config.tensorboard_dir} needs the tensorboard package "
                       "(pip install -r requirements/runtime.txt -c requirements/constraints.txt)")
    if config.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        missing.append(f"--wandb-project {config.wandb_project} needs the wandb package (pip install wandb), "
                       "or leave the flag out")
    if missing:
        raise SystemExit("pretrain: " + "; ".join(missing))


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (days as ``Nd h:mm:ss``)."""
    whole = max(0, round(seconds))
    days, rest = divmod(whole, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class _Interval:
    """Sums over the iterations since the last printed line."""

    def __init__(self) -> None:
        self.iterations = 0
        self.seconds = 0.0
        self.flops: float | None = 0.0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.skipped = 0
        self.nan = 0


class TrainingLogger:
    """Per-iteration logging on ``rank`` of ``world_size`` ranks; see the module docstring.

    ``run_config``: what the W&B run records as its config (e.g. ``vars(args)``).
    """

    def __init__(self, config: LogConfig, rank: int, world_size: int, run_config: Mapping[str, Any] | None = None,
                 on_cpu: bool = False):
        require_logging_packages(config)
        self.config, self.rank, self.world_size, self.on_cpu = config, rank, world_size, on_cpu
        self.is_writer = rank == world_size - 1
        self._interval = _Interval()
        self.total_skipped = 0
        self.total_nan = 0
        self._tensorboard = None
        self._wandb = None
        if self.is_writer and config.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=config.tensorboard_dir, max_queue=config.log_interval)
        if self.is_writer and config.wandb_project is not None:
            import wandb

            self._wandb = wandb.init(project=config.wandb_project, name=config.wandb_exp_name,
                                     dir=config.wandb_save_dir, config=dict(run_config or {}))

    def log(self, *, iteration: int, train_iters: int, consumed_samples: int, global_batch_size: int,
            elapsed_s: float, learning_rate: float, loss: float | None, grad_norm: float | None, skipped: bool,
            flops: float | None = None, max_memory_bytes: int | None = None, loss_scale: float | None = None,
            bad_samples: str | None = None) -> str | None:
        """Record iteration ``iteration`` (1-based) and print/write what is due; returns the printed line.

        ``elapsed_s``: this iteration's wall time; ``loss``: its loss averaged over data-parallel
        ranks, None on ranks without one; ``skipped``: the model was not updated (NaN/Inf loss under
        the skip policy, fp16 overflow); ``flops``: model FLOPs of the whole iteration over all ranks
        (``mm.training.flops``), needed for the throughput; ``max_memory_bytes``: this rank's peak
        device memory; ``bad_samples``: the data loader's summary, from the rank that reads data.
        """
        loss = None if loss is None else float(loss)
        is_nan = loss is not None and not math.isfinite(loss)
        counts = self._interval
        counts.iterations += 1
        counts.seconds += elapsed_s
        counts.flops = None if flops is None or counts.flops is None else counts.flops + flops
        counts.skipped += int(skipped)
        counts.nan += int(is_nan)
        self.total_skipped += int(skipped)
        self.total_nan += int(is_nan)
        if loss is not None and not is_nan and not skipped:
            counts.loss_sum += loss
            counts.loss_count += 1

        if self.is_writer and iteration % self.config.tensorboard_log_interval == 0:
            self._write_scalars(iteration, consumed_samples, global_batch_size, elapsed_s, learning_rate, loss,
                                grad_norm, flops, max_memory_bytes, loss_scale)
        if iteration % self.config.log_interval and iteration != train_iters:
            return None
        line = None
        if self.is_writer:
            line = self._line(iteration, train_iters, consumed_samples, global_batch_size, learning_rate, grad_norm,
                              max_memory_bytes, loss_scale)
            print(line, flush=True)
        if bad_samples:
            print(f" data: {bad_samples}", flush=True)
        self._interval = _Interval()
        return line

    def _line(self, iteration, train_iters, consumed_samples, global_batch_size, learning_rate, grad_norm,
              max_memory_bytes, loss_scale) -> str:
        c = self._interval
        per_iteration = c.seconds / c.iterations
        fields = [f"iteration {iteration:6d}/{train_iters}", f"consumed samples: {consumed_samples:12d}",
                  f"elapsed time per iteration (ms): {per_iteration * 1000:.1f}",
                  f"time to finish: {_clock(per_iteration * (train_iters - iteration))}"]
        if self.config.log_throughput and c.flops is not None and c.seconds > 0:
            tflops = tflops_per_device(c.flops, c.seconds, self.world_size)
            fields.append(f"throughput per CPU process (GFLOP/s): {tflops * 1000:.2f}" if self.on_cpu else
                          f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
        fields += [f"learning rate: {learning_rate:.6e}", f"global batch size: {global_batch_size:5d}",
                   f"loss: {c.loss_sum / c.loss_count:.6e}" if c.loss_count else "loss: nan"]
        if loss_scale is not None:
            fields.append(f"loss scale: {loss_scale:.1f}")
        if grad_norm is not None:
            fields.append(f"grad norm: {float(grad_norm):.3f}")
        fields += [f"number of skipped iterations: {c.skipped:3d}", f"number of nan iterations: {c.nan:3d}"]
        if max_memory_bytes is not None and not self.on_cpu:
            fields.append(f"max memory (GiB): {max_memory_bytes / 2**30:.1f}")
        return f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] " + " | ".join(fields) + " |"

    def _write_scalars(self, iteration, consumed_samples, global_batch_size, elapsed_s, learning_rate, loss,
                       grad_norm, flops, max_memory_bytes, loss_scale) -> None:
        if self._tensorboard is None and self._wandb is None:
            return
        scalars = {"learning-rate": learning_rate, "batch-size": global_batch_size, "iteration-time": elapsed_s,
                   "skipped-iterations": self.total_skipped, "nan-iterations": self.total_nan}
        if loss is not None:
            scalars["loss"] = loss
        if grad_norm is not None:
            scalars["grad-norm"] = float(grad_norm)
        if loss_scale is not None:
            scalars["loss-scale"] = loss_scale
        if self.config.log_throughput and flops is not None and elapsed_s > 0:
            scalars["throughput"] = tflops_per_device(flops, elapsed_s, self.world_size)
        if max_memory_bytes is not None:
            scalars["mem-max-allocated-bytes"] = max_memory_bytes
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, iteration)
            # Megatron-LM's x-axis of samples, for comparing runs with different batch sizes
            for name in ("loss", "learning-rate", "grad-norm"):
                if name in scalars:
                    self._tensorboard.add_scalar(f"{name} vs samples", scalars[name], consumed_samples)
        if self._wandb is not None:
            self._wandb.log(scalars, step=iteration)

    def close(self) -> None:
        """Flush and close the TensorBoard writer and finish the W&B run."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "TrainingLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["OK", "SKIP", "LogConfig", "TrainingLogger", "check_loss", "require_logging_packages"]
