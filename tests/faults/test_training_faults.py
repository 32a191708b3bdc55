"""The training loop against bad configuration, bad data and divergence: real torchrun jobs of
pretrain_t2v.py on the quickstart's tiny model (CPU, gloo).

Each test prints a ``figure:`` line (time to detect, steps lost) for docs/reliability.md; run with
``-s`` to see them. Configuration faults stop every rank with exit code 2 before any process group
starts (torchrun then reports the worker's exit code 2 and exits 1); divergence stops every rank
with exit code 1.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import pytest

from tests.faults import jobs
from tests.faults.conftest import train_args

SCRIPT = "pretrain_t2v.py"
STARTED = "rank(s) on"  # mm.runtime's line once the process groups exist
ITERATION = re.compile(r"iteration +\d+/\d+")


def _launch(tmp_path, nproc: int, *args: str, log: str = "job.log") -> tuple[int, str, float]:
    """Run the job to its end: (torchrun's exit code, output, seconds from launch to exit)."""
    began = time.monotonic()
    rc, out = jobs.run(jobs.torchrun(nproc, SCRIPT, *args), tmp_path / log, timeout=300)
    return rc, out, time.monotonic() - began


def _worker_exit_codes(out: str) -> list[int]:
    """The workers' exit codes in torchrun's failure report."""
    return [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", out)]


def _stopped_before_groups(rc: int, out: str) -> None:
    assert rc != 0, out[-3000:]
    assert _worker_exit_codes(out) and set(_worker_exit_codes(out)) == {2}, out[-3000:]
    assert STARTED not in out and not ITERATION.search(out), out[-3000:]


# --- unwritable output directories ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["under_a_file", "read_only_dir"])
def test_unwritable_save_is_refused_before_training(quickstart, tmp_path, how):
    if how == "under_a_file":
        (tmp_path / "a_file").write_text("not a directory")
        save, reason = tmp_path / "a_file" / "ckpt", "Not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0o555 directory; the under_a_file variant covers root")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        save, reason = locked / "ckpt", "Permission denied"
    rc, out, seconds = _launch(tmp_path, 1, *train_args(quickstart, "--save", str(save), "--save-interval", "2",
                                                        "--tensorboard-dir", str(tmp_path / "tb"), iters=4))
    _stopped_before_groups(rc, out)
    assert f"--save {save}: cannot create and write this directory ({reason}" in out, out[-3000:]
    assert "--tensorboard-dir" not in out  # that one is writable
    print(f"figure: unwritable --save ({how}): exit after {seconds:.1f} s, 0 iterations run")


# --- data files --------------------------------------------------------------------------------------

def _data_variant(quickstart, tmp_path, fault: str) -> str:
    """A data JSON like the quickstart's whose data.txt has ``fault``; returns its path."""
    data = json.loads((quickstart / "data.json").read_text())
    data_txt = tmp_path / "data.txt"
    annotation = quickstart / "data" / "annotation.json"
    root = quickstart / "data"
    if fault == "corrupt_annotation":
        text = annotation.read_text()
        annotation = tmp_path / "annotation.json"
        annotation.write_text(text[: len(text) // 2])  # cut in the middle of a record
        data_txt.write_text(f"{root},{annotation}\n")
    elif fault == "missing_data_txt":
        data_txt = tmp_path / "no_such_data.txt"
    elif fault == "missing_video_root":
        data_txt.write_text(f"{tmp_path / 'no_such_videos'},{annotation}\n")
    data["dataset_param"]["basic_parameters"]["data_path"] = str(data_txt)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return str(path)


EXPECTED = {
    "corrupt_annotation": r"data\.txt:1: annotation file '.*annotation\.json': not valid JSON \(.* at line \d+, "
                          r"column \d+\)",
    "missing_data_txt": r"dataset_param\.basic_parameters\.data_path = '.*no_such_data\.txt': no such file",
    "missing_video_root": r"data\.txt:1: dataset root '.*no_such_videos' is not a directory \(no such path\)",
}


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_bad_data_files_stop_before_process_groups(quickstart, tmp_path, fault):
    data_json = _data_variant(quickstart, tmp_path, fault)
    args = train_args(quickstart, iters=2)
    args[args.index("--mm-data") + 1] = data_json
    rc, out, seconds = _launch(tmp_path, 1, *args)
    _stopped_before_groups(rc, out)
    assert re.search(r"pretrain_t2v\.py: error: .*" + EXPECTED[fault], out), out[-3000:]
    assert "JSONDecodeError" not in out
    print(f"figure: {fault}: exit 2 after {seconds:.1f} s, 0 iterations run")


# --- divergence ----------------------------------------------------------------------------------------

def test_divergence_stops_after_consecutive_skipped_iterations(quickstart, tmp_path):
    # Adam at lr 1e3: the first update makes every later loss NaN (the weights stay finite, huge)
    ckpt = tmp_path / "ckpt"
    job = jobs.Job(jobs.torchrun(1, SCRIPT, *train_args(
        quickstart, "--lr", "1e3", "--save", str(ckpt), "--save-interval", "2",
        "--max-consecutive-skipped-iterations", "3", iters=20)), tmp_path / "job.log").start()
    try:
        job.wait_for(r"iteration +2/20 .*loss: nan", timeout=240)
        first_nan = time.monotonic()
        rc = job.wait(timeout=240)
    finally:
        job.stop()
    seconds, out = time.monotonic() - first_nan, job.output()
    assert rc != 0 and set(_worker_exit_codes(out)) == {1}, out[-3000:]
    assert "pretrain_t2v.py: error: stopping at iteration 4: 3 iterations in a row (2 to 4) were skipped" in out
    assert "--max-consecutive-skipped-iterations 3" in out
    assert "not saving at iteration 2: its loss is NaN/Inf" in out
    assert "iteration      4/20" in out and "iteration      5/20" not in out
    assert not list(ckpt.glob("iter_*")) and not (ckpt / "latest_checkpointed_iteration.txt").exists()
    print(f"figure: divergence (NaN from iteration 2, limit 3): stopped at iteration 4, {seconds:.1f} s after the "
          "first NaN loss; no checkpoint written")


def test_non_finite_weights_are_never_saved(quickstart, tmp_path):
    # SGD warm-up: iteration 1 runs at lr 0 (saved); iteration 2's update at lr 1.5e38 with weight
    # decay 1000 overflows fp32, so the weights hold Inf/NaN while iteration 2's loss was still finite
    ckpt = tmp_path / "ckpt"
    job = jobs.Job(jobs.torchrun(1, SCRIPT, *train_args(
        quickstart, "--optimizer", "sgd", "--lr", "3e38", "--lr-warmup-iters", "2", "--weight-decay", "1000",
        "--clip-grad", "0", "--save", str(ckpt), "--save-interval", "1", "--ckpt-format", "torch", iters=4)),
        tmp_path / "job.log").start()
    try:
        job.wait_for(r"iteration +2/4 ", timeout=240)
        fault = time.monotonic()
        rc = job.wait(timeout=240)
    finally:
        job.stop()
    seconds, out = time.monotonic() - fault, job.output()
    assert rc != 0 and set(_worker_exit_codes(out)) == {1}, out[-3000:]
    assert "pretrain_t2v.py: error: iteration 2: the model weights hold NaN/Inf values; refusing to save them" in out
    assert "the last checkpoint this run saved is iteration 1" in out
    assert [p.name for p in ckpt.glob("iter_*")] == ["iter_0000001"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert "iteration      3/4" not in out
    print(f"figure: non-finite weights at a save: refused at iteration 2, exit {seconds:.1f} s after its log line; "
          "checkpoint 1 kept, 1 step lost")


# --- bad samples over data-parallel ranks ----------------------------------------------------------------

def _corrupt_first_samples(quickstart, tmp_path, dp: int, seed: int) -> tuple[str, list[int]]:
    """A copy of the quickstart data with the first sample of each of ``dp`` data-parallel ranks
    overwritten with random bytes; returns the data JSON and each rank's count of bad samples."""
    from mm.data import BucketSampler, VideoDataConfig, VideoDataset, read_data_txt

    root = tmp_path / "data"
    shutil.copytree(quickstart / "data", root)
    records = json.loads((root / "annotation.json").read_text())
    (root / "data.txt").write_text(f"{root},{root / 'annotation.json'}\n")
    data = json.loads((quickstart / "data.json").read_text())
    data["dataset_param"]["basic_parameters"]["data_path"] = str(root / "data.txt")
    (tmp_path / "data.json").write_text(json.dumps(data))
    samples, _ = read_data_txt(root / "data.txt")
    dataset = VideoDataset(samples, VideoDataConfig.from_json(data["dataset_param"]["preprocess_parameters"]))
    firsts = [next(iter(BucketSampler(dataset.bucket_of, 1, rank, dp, seed=seed)))[0] for rank in range(dp)]
    noise = random.Random(0)
    for index in firsts:
        (root / records[index]["path"]).write_bytes(noise.randbytes(4000))
    return str(tmp_path / "data.json"), [len(dataset[index]["skipped"]) for index in firsts]


def test_bad_samples_are_summed_over_data_parallel_ranks(quickstart, tmp_path):
    data_json, per_rank = _corrupt_first_samples(quickstart, tmp_path, dp=2, seed=7)
    assert min(per_rank) >= 1
    args = train_args(quickstart, iters=1)
    args[args.index("--mm-data") + 1] = data_json
    rc, out, _ = _launch(tmp_path, 2, *args)
    assert rc == 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith(" data: ")]
    assert lines == [f" data: skipped {sum(per_rank)} bad samples on 2 data-parallel ranks "
                     f"({{'unreadable': {sum(per_rank)}}})"], out[-3000:]
    print(f"figure: bad samples on 2 DP ranks: {per_rank} counted, summary {sum(per_rank)}")


# --- a pipeline stage that starts late -------------------------------------------------------------------

def test_later_stages_wait_for_stage_0s_encoders_past_the_timeout(quickstart, tmp_path):
    """PP2: stage 0 builds the frozen encoders and the data loader; here that takes 12 s, while every
    collective's timeout is 6 s (0.1 minutes). Stage 1 waits for it outside any collective instead
    of in its first receive, and the run trains to its end."""
    model = json.loads((quickstart / "model.json").read_text())
    model["predictor"]["pipeline_num_layers"] = [1, 1]
    (tmp_path / "model.json").write_text(json.dumps(model))
    args = train_args(quickstart, "--pipeline-model-parallel-size", "2", "--distributed-timeout-minutes", "0.1",
                      iters=2)
    args[args.index("--mm-model") + 1] = str(tmp_path / "model.json")
    began = time.monotonic()
    rc, out = jobs.run(jobs.torchrun(2, "tests/faults/slow_phase.py", SCRIPT, *args),
                       tmp_path / "job.log", timeout=400,
                       env=jobs.cpu_env(MM_SLOW_PHASE="mm.training.pretrain:build_video_dataloader=12"))
    seconds = time.monotonic() - began
    assert rc == 0, out[-4000:]
    assert out.count("slow_phase: build_video_dataloader sleeps") == 1, out[-4000:]  # stage 0 only
    assert re.search(r"iteration +2/2 ", out), out[-4000:]
    print(f"figure: PP2, stage 0 starts 12 s late, 6 s timeout: trained, {seconds:.1f} s in all")
