"""The training loop's guards: the writable-directory and data-file checks the entry points run
before any process group starts, the limit on consecutive skipped iterations, the finite-weights
check before a save, and the bad-sample counts summed over data-parallel ranks."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from collections import Counter

import pytest
import torch

from mm.arguments import parse_flags
from mm.arguments.json_configs import DataConfig
from mm.data import SkipCounter
from mm.training.checks import output_dir_problems, read_data_files, writable_dir_problem
from mm.training.divergence import SkipStreak, skip_counts, weights_finite
from tests.dist_helper import run_distributed


def _dirs(save=None, tensorboard_dir=None, wandb_save_dir=None) -> Namespace:
    return Namespace(save=save, tensorboard_dir=tensorboard_dir, wandb_save_dir=wandb_save_dir)


def test_output_dirs_are_created_and_probed(tmp_path):
    target = tmp_path / "new" / "ckpt"
    assert output_dir_problems(_dirs(save=str(target), tensorboard_dir=str(tmp_path / "tb"))) == []
    assert target.is_dir() and (tmp_path / "tb").is_dir()
    assert list(target.iterdir()) == []  # the probe file is gone


def test_a_directory_under_a_file_names_the_flag_path_and_reason(tmp_path):
    (tmp_path / "file").write_text("x")
    problems = output_dir_problems(_dirs(save=str(tmp_path / "ok"), tensorboard_dir=str(tmp_path / "file" / "tb"),
                                         wandb_save_dir=str(tmp_path / "file")))
    assert len(problems) == 2
    assert problems[0].startswith(f"--tensorboard-dir {tmp_path / 'file' / 'tb'}: cannot create and write this "
                                  "directory (Not a directory")
    assert problems[1].startswith(f"--wandb-save-dir {tmp_path / 'file'}: cannot create and write this directory "
                                  "(File exists")


def test_a_read_only_directory_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o555 directory; test_a_directory_under_a_file_... covers the refusal")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        problem = writable_dir_problem("--save", str(locked))
    finally:
        locked.chmod(0o755)
    assert problem is not None and "(Permission denied on" in problem and str(locked) in problem


def test_a_relative_path_says_where_it_is_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    assert f"--save file/ckpt (from {tmp_path}): cannot" in writable_dir_problem("--save", "file/ckpt")


def _data(tmp_path, line: str) -> DataConfig:
    (tmp_path / "data.txt").write_text(line + "\n")
    return DataConfig(path="data.json", dataset_type="t2v", data_path=str(tmp_path / "data.txt"))


def test_data_files_are_read_once_and_kept_for_the_loader(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    (tmp_path / "annotation.json").write_text(json.dumps([{"path": "clip.mp4", "cap": "a clip"}]))
    data = _data(tmp_path, f"{tmp_path},{tmp_path / 'annotation.json'}")
    assert read_data_files(data) == []
    samples, dropped = data.sources
    assert [s.caption for s in samples] == ["a clip"] and not dropped


def test_data_file_problems_name_the_file_and_position(tmp_path):
    (tmp_path / "annotation.json").write_text('[{"path": "clip.mp4",\n  "cap": "a clip"\n')
    data = _data(tmp_path, f"{tmp_path},{tmp_path / 'annotation.json'}")
    [problem] = read_data_files(data)
    assert problem == (f"{tmp_path / 'data.txt'}:1: annotation file '{tmp_path / 'annotation.json'}': not valid JSON "
                       "(Expecting ',' delimiter at line 3, column 1)")
    assert data.sources is None
    [problem] = read_data_files(_data(tmp_path, f"{tmp_path / 'videos'},{tmp_path / 'annotation.json'}"))
    assert problem.startswith(f"{tmp_path / 'data.txt'}:1: dataset root '{tmp_path / 'videos'}' is not a directory "
                              "(no such path)")
    data = DataConfig(path="data.json", dataset_type="t2v", data_path=str(tmp_path / "absent.txt"))
    assert read_data_files(data) == [f"dataset_param.basic_parameters.data_path = '{tmp_path / 'absent.txt'}': "
                                     "no such file"]


def test_the_skip_limit_flag():
    assert parse_flags(["--mm-model", "m.json"]).max_consecutive_skipped_iterations == 10
    assert parse_flags(["--mm-model", "m.json", "--max-consecutive-skipped-iterations", "0"]) \
        .max_consecutive_skipped_iterations == 0
    from mm.arguments import ConfigError

    with pytest.raises(ConfigError, match="argument --max-consecutive-skipped-iterations: must be an integer >= 0, "
                                          "got -1"):
        parse_flags(["--mm-model", "m.json", "--max-consecutive-skipped-iterations", "-1"])


def test_a_streak_of_skipped_iterations_reaches_the_limit():
    streak = SkipStreak(3)
    for iteration, counts in [(1, True), (2, True), (3, False), (4, True), (5, True)]:
        streak.update(iteration, counts)
        assert not streak.exceeded
    streak.update(6, True)
    assert streak.exceeded and (streak.first, streak.length) == (4, 3)
    never = SkipStreak(0)
    for iteration in range(1, 100):
        never.update(iteration, True)
    assert not never.exceeded


def test_which_skips_count():
    assert skip_counts(nan_loss=True, overflow=False, loss_scale=None, min_loss_scale=1.0, static_scale=False)
    assert not skip_counts(nan_loss=False, overflow=False, loss_scale=None, min_loss_scale=1.0, static_scale=False)
    # fp16: the dynamic scaler still searching for its scale
    assert not skip_counts(nan_loss=False, overflow=True, loss_scale=2.0**20, min_loss_scale=1.0, static_scale=False)
    assert skip_counts(nan_loss=False, overflow=True, loss_scale=1.0, min_loss_scale=1.0, static_scale=False)
    assert skip_counts(nan_loss=False, overflow=True, loss_scale=2.0**20, min_loss_scale=1.0, static_scale=True)


def _finite_worker(rank, world, poison_rank, where):
    model = [torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)]
    averages = [{"w": torch.zeros(2)}]
    if rank == poison_rank:
        with torch.no_grad():
            if where == "weights":
                model[1].bias[0] = float("inf")
            else:
                averages[0]["w"][1] = float("nan")
    return weights_finite(model, averages)


def test_non_finite_weights_on_one_rank_are_seen_by_every_rank():
    assert run_distributed(2, _finite_worker, None, "weights") == [True, True]
    assert run_distributed(2, _finite_worker, 1, "weights") == [False, False]
    assert run_distributed(2, _finite_worker, 0, "averages") == [False, False]


def _gather_worker(rank, world):
    counter = SkipCounter(Counter({"unreadable": rank + 1, **({"too short": 2} if rank == 1 else {})}))
    return counter.gathered().summary()


def test_bad_sample_counts_are_summed_over_ranks():
    assert run_distributed(2, _gather_worker) == [
        "skipped 5 bad samples on 2 data-parallel ranks ({'too short': 2, 'unreadable': 3})"] * 2
    assert SkipCounter(Counter({"missing": 1})).summary() == "skipped 1 bad samples ({'missing': 1})"
