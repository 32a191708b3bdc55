"""The training logger: the iteration line, interval averages, TensorBoard events read back from
disk, W&B calls, the NaN/Inf loss policy."""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types

import pytest

from mm.arguments import parse_flags
from mm.training.logger import LogConfig, TrainingLogger, check_loss
from tests.dist_helper import run_distributed

LOSS_RE = re.compile(r"\| loss: ([0-9.e+-]+) \|")  # what tests/functional parse


def _step(logger, iteration, loss, skipped=False, train_iters=10, **extra):
    values = dict(iteration=iteration, train_iters=train_iters, consumed_samples=8 * iteration, global_batch_size=8,
                  elapsed_s=0.5 * iteration, learning_rate=1e-4 * iteration, loss=loss, grad_norm=2.0 * iteration,
                  skipped=skipped, flops=4e12, max_memory_bytes=3 * 2**30)
    values.update(extra)
    return logger.log(**values)


def test_line_has_megatron_fields_and_interval_averages(capsys):
    logger = TrainingLogger(LogConfig(log_interval=2, log_throughput=True), rank=0, world_size=1)
    assert _step(logger, 1, 1.0) is None
    line = _step(logger, 2, 3.0)
    assert capsys.readouterr().out.strip() == line.strip()
    assert re.search(r"\] iteration      2/10 \| consumed samples:           16 \| ", line)
    assert "| elapsed time per iteration (ms): 750.0 | time to finish: 0:00:06 |" in line  # 8 left x 0.75 s
    assert "| throughput per GPU (TFLOP/s/GPU): 5.3 |" in line  # 8e12 FLOPs / 1.5 s / 1 rank
    assert "| learning rate: 2.000000e-04 | global batch size:     8 |" in line
    assert [float(x) for x in LOSS_RE.findall(line)] == [2.0]
    assert "| grad norm: 4.000 | number of skipped iterations:   0 | number of nan iterations:   0 |" in line
    assert line.endswith("| max memory (GiB): 3.0 |")


def test_skipped_and_nan_iterations_are_counted_and_left_out_of_the_average(capsys):
    logger = TrainingLogger(LogConfig(log_interval=4), rank=0, world_size=1)
    _step(logger, 1, 2.0)
    _step(logger, 2, float("nan"), skipped=True)
    _step(logger, 3, 5.0, skipped=True)  # e.g. an fp16 overflow: finite loss, no update
    line = _step(logger, 4, 4.0)
    assert [float(x) for x in LOSS_RE.findall(line)] == [3.0]
    assert "number of skipped iterations:   2 | number of nan iterations:   1 |" in line
    assert "throughput" not in line  # only with --log-throughput
    # counts are per interval; the last iteration is always printed
    line = _step(logger, 5, 1.0, train_iters=5)
    assert "number of skipped iterations:   0 | number of nan iterations:   0 |" in line
    assert [float(x) for x in LOSS_RE.findall(line)] == [1.0]
    assert (logger.total_skipped, logger.total_nan) == (2, 1)
    line = TrainingLogger(LogConfig(log_interval=1), 0, 1).log(
        iteration=1, train_iters=1, consumed_samples=1, global_batch_size=1, elapsed_s=1.0, learning_rate=0.1,
        loss=float("inf"), grad_norm=None, skipped=True)
    assert "| loss: nan |" in line and "grad norm" not in line and "max memory" not in line


def test_only_the_last_rank_prints_the_line_and_the_reader_prints_bad_samples(capsys):
    first = TrainingLogger(LogConfig(log_interval=1), rank=0, world_size=2)
    assert _step(first, 1, None, bad_samples="skipped 2 bad samples ({'too short': 2})") is None
    assert capsys.readouterr().out == " data: skipped 2 bad samples ({'too short': 2})\n"
    last = TrainingLogger(LogConfig(log_interval=1), rank=1, world_size=2)
    line = _step(last, 1, 0.25)
    assert capsys.readouterr().out == line + "\n"


def test_tensorboard_events_on_the_last_rank(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = LogConfig(log_interval=100, log_throughput=True, tensorboard_dir=str(tmp_path / "tb"),
                       tensorboard_log_interval=2)
    with TrainingLogger(config, rank=0, world_size=2) as other:
        _step(other, 2, None)
    assert not (tmp_path / "tb").exists()
    with TrainingLogger(config, rank=1, world_size=2) as logger:
        for it, loss in [(1, 1.0), (2, 0.5), (3, float("nan")), (4, 0.25)]:
            _step(logger, it, loss, skipped=loss != loss)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()

    def series(tag):
        return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]

    assert series("loss") == [(2, 0.5), (4, 0.25)]
    assert series("loss vs samples") == [(16, 0.5), (32, 0.25)]
    assert series("learning-rate") == [(2, 2e-4), (4, 4e-4)]
    assert series("grad-norm") == [(2, 4.0), (4, 8.0)]
    assert series("iteration-time") == [(2, 1.0), (4, 2.0)]
    assert series("throughput") == [(2, 2.0), (4, 1.0)]  # 4e12 FLOPs / (1 s or 2 s) / 2 ranks
    assert series("skipped-iterations") == [(2, 0), (4, 1)]
    assert series("nan-iterations") == [(2, 0), (4, 1)]
    assert series("mem-max-allocated-bytes") == [(2, 3 * 2**30), (4, 3 * 2**30)]
    assert series("batch-size") == [(2, 8), (4, 8)]


def test_wandb_gets_the_same_scalars(monkeypatch, tmp_path):
    calls = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, dict(scalars)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = LogConfig(log_interval=10, wandb_project="mm-tests", wandb_exp_name="run1",
                       wandb_save_dir=str(tmp_path))
    with TrainingLogger(config, rank=3, world_size=4, run_config={"lr": 1e-4}) as logger:
        _step(logger, 1, 0.75)
    assert calls[0] == ("init", {"project": "mm-tests", "name": "run1", "dir": str(tmp_path), "config": {"lr": 1e-4}})
    assert calls[1][:2] == ("log", 1) and calls[1][2]["loss"] == 0.75 and calls[1][2]["learning-rate"] == 1e-4
    assert calls[2] == ("finish",)
    calls.clear()
    with TrainingLogger(config, rank=0, world_size=4) as logger:
        _step(logger, 1, None)
    assert calls == []


def test_missing_packages_stop_with_the_flag_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard")
                        else real(name, *a))
    with pytest.raises(SystemExit, match=r"--wandb-project proj needs the wandb package \(pip install wandb\)"):
        TrainingLogger(LogConfig(wandb_project="proj"), rank=0, world_size=2)
    with pytest.raises(SystemExit, match="--tensorboard-dir runs/tb needs the tensorboard package"):
        TrainingLogger(LogConfig(tensorboard_dir="runs/tb"), rank=0, world_size=2)


def test_log_config_from_the_flags():
    args = parse_flags(["--mm-model", "m.json", "--log-interval", "5", "--log-throughput", "--tensorboard-dir", "tb",
                        "--tensorboard-log-interval", "3", "--wandb-project", "p", "--wandb-exp-name", "e",
                        "--wandb-save-dir", "w"])
    assert LogConfig.from_args(args) == LogConfig(5, True, "tb", 3, "p", "e", "w")


def test_nan_policy():
    import torch

    assert check_loss(0.5, exit_on_nan=True) == "ok"
    assert check_loss(None, exit_on_nan=True) == "ok"  # a rank without a loss
    assert check_loss(torch.tensor(float("nan")), exit_on_nan=False) == "skip"
    assert check_loss(float("-inf"), exit_on_nan=False) == "skip"
    with pytest.raises(SystemExit, match="NaN/Inf at iteration 7; stopping because of --exit-on-nan-loss"):
        check_loss(float("inf"), exit_on_nan=True, iteration=7)


def _agree_worker(rank, world, exit_on_nan):
    loss = float("nan") if rank == world - 1 else None  # only the last pipeline stage has the loss
    try:
        return check_loss(loss, exit_on_nan, iteration=3, device="cpu")
    except SystemExit as e:
        return f"exit: {e}"


def test_every_rank_gets_the_same_verdict():
    assert run_distributed(2, _agree_worker, False) == ["skip", "skip"]
    verdicts = run_distributed(2, _agree_worker, True)
    assert all(v.startswith("exit: pretrain: the loss is NaN/Inf at iteration 3") for v in verdicts)


def test_time_to_finish_follows_the_interval_pace(capsys):
    logger = TrainingLogger(LogConfig(log_interval=1), rank=0, world_size=1)
    line = _step(logger, 1, 1.0, train_iters=10001, elapsed_s=90.0)  # the first iteration (start-up)
    assert "| time to finish: 10d 10:00:00 |" in line  # 10,000 iterations x 90 s
    assert "| time to finish: 0:00:24 |" in _step(logger, 2, 1.0, train_iters=14, elapsed_s=2.0)
    assert "| time to finish: 0:00:00 |" in _step(logger, 14, 1.0, train_iters=14, elapsed_s=2.0)


def test_cpu_runs_report_gflops_per_process_and_no_device_memory(capsys):
    logger = TrainingLogger(LogConfig(log_interval=1, log_throughput=True), rank=1, world_size=2, on_cpu=True)
    line = _step(logger, 1, 1.0, flops=3e9, elapsed_s=0.5, max_memory_bytes=0)
    assert "| throughput per CPU process (GFLOP/s): 3.00 |" in line  # 3e9 FLOPs / 0.5 s / 2 processes
    assert "TFLOP/s" not in line and "max memory" not in line
