"""Checkpoint and mm-convert faults on real processes: a damaged safetensors release given to
mm-convert, a damaged latest checkpoint given to ``--load`` (with and without
``--load-fallback``), and a training job killed with SIGKILL in the middle of a save.

Each test prints a ``measured:`` line (time to detect, steps lost); the conftest checks that no
process outlives it (docs/reliability.md, "Checkpoints and mm-convert").
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.faults import jobs
from tests.faults.conftest import train_args

SCRIPT = "pretrain_t2v.py"
# a rank's Python traceback (torchrun's own report of a failed rank is in torch/distributed/)
OUR_TRACEBACK = re.compile(r'File "[^"]*/(mm|checkpoint|megatron)/|^\[rank\d+\]: Traceback', re.M)


def _kill_whole_job(job: jobs.Job) -> None:
    """SIGKILL every process of the job at once, as a node failure or the scheduler would: torchrun's
    process group and each rank's (torchrun starts every rank in a session of its own, so the
    launcher's group alone does not reach them; a rank's group holds its helpers too)."""
    groups = {job.proc.pid}
    for pid in jobs.descendants(job.proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _iterations(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"iteration +(\d+)/ *\d+ \|", output)]


def _launch(assets, log: Path, *flags: str, iters: int) -> tuple[int, str, float]:
    """pretrain_t2v.py on 2 CPU ranks to its end: (exit code, output, seconds)."""
    start = time.monotonic()
    rc, out = jobs.run(jobs.torchrun(2, SCRIPT, *train_args(assets, *flags, iters=iters)), log)
    return rc, out, time.monotonic() - start


# ---------------------------------------------------------------------------------------------- mm-convert


@pytest.fixture(scope="module")
def hf_release(tmp_path_factory) -> Path:
    """A tiny Wan DiT release in diffusers' layout (config.json + one safetensors file)."""
    from tests.wan_helpers import diffusers_model, tiny_kwargs

    root = tmp_path_factory.mktemp("hf_release")
    diffusers_model(tiny_kwargs(layers=2)).save_pretrained(str(root), safe_serialization=True)
    return root


def _damage(data: bytes, damage: str) -> bytes:
    header_end = 8 + int.from_bytes(data[:8], "little")
    if damage == "truncated":  # a download cut short: the header promises more than the file holds
        return data[:header_end + (len(data) - header_end) * 2 // 3]
    return data[:8] + b"\x00" * (header_end - 8) + data[header_end:]  # the header overwritten


@pytest.mark.parametrize("damage", ["truncated", pytest.param("corrupt_header", marks=pytest.mark.extended)])
def test_damaged_safetensors_given_to_mm_convert(tmp_path, hf_release, damage):
    """hf_to_mm of a damaged release: exit code 1, one error line naming the file (and the tensor
    whose bytes are missing), no traceback, no target and no temporary directory (before: exit 0,
    the missing bytes written as zeros)."""
    source = tmp_path / "hf"
    source.mkdir()
    shutil.copy(hf_release / "config.json", source)
    weights = source / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(_damage((hf_release / weights.name).read_bytes(), damage))
    target = tmp_path / "mm"
    start = time.monotonic()
    rc, out = jobs.run([sys.executable, "-m", "checkpoint", "WanConverter", "--version", "wan2.1", "hf_to_mm",
                        "--cfg.source_path", str(source), "--cfg.target_path", str(target),
                        "--cfg.target_parallel_config.tp_size", "2"], tmp_path / "convert.log")
    seconds = time.monotonic() - start
    assert rc == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("mm-convert: error:")]
    assert len(errors) == 1 and str(weights) in errors[0], out[-3000:]
    if damage == "truncated":
        assert re.search(r"tensor '[^']+' lies at bytes \[\d+, \d+\), past the file's end", errors[0]), errors
    assert "Traceback" not in out, out[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert.log", "hf"]  # nothing written
    print(f"measured: mm-convert hf_to_mm of a {damage} safetensors file: exit {rc} after {seconds:.1f} s, "
          "nothing written")


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def killed_and_resumed(quickstart, tmp_path_factory):
    """The job of ``test_job_killed_mid_save_resumes_from_the_newest_complete_checkpoint``, run once
    by whichever test asks first (inside that test, so its orphan check covers it): 2 ranks saving
    every iteration, killed with SIGKILL as soon as the save of iteration 3 is under way, then
    relaunched with --load to iteration 3. Leaves ``ckpt/`` with complete checkpoints 1 to 3,
    which the damaged-checkpoint tests copy."""
    done: dict = {}

    def get() -> dict:
        if not done:
            done.update(_kill_mid_save_then_resume(quickstart, tmp_path_factory.mktemp("killed")))
        return done

    return get


def _kill_mid_save_then_resume(assets: Path, root: Path) -> dict:
    save = root / "ckpt"
    flags = ("--save", str(save), "--load", str(save), "--save-interval", "1")
    job = jobs.Job(jobs.torchrun(2, SCRIPT, *train_args(assets, *flags, iters=8)), root / "killed.log").start()
    saving = save / ".iter_0000003.tmp"
    try:
        deadline = time.monotonic() + 300
        while not saving.exists():
            assert job.proc.poll() is None, f"the job ended before saving iteration 3:\n{job.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {saving} within 300 s:\n{job.output()[-3000:]}"
            time.sleep(0.01)
        _kill_whole_job(job)
        job.proc.wait(timeout=60)
    finally:
        job.stop()
    killed_output = job.output()
    tracker = (save / "latest_checkpointed_iteration.txt").read_text().strip()
    rc, out, seconds = _launch(assets, root / "resumed.log", *flags, iters=3)
    return {"save": save, "tracker_after_kill": tracker, "trained_before_kill": max(_iterations(killed_output)),
            "rc": rc, "output": out, "seconds": seconds}


def test_job_killed_mid_save_resumes_from_the_newest_complete_checkpoint(killed_and_resumed):
    run = killed_and_resumed()
    save, out = run["save"], run["output"]
    assert run["tracker_after_kill"] == "2"  # the save in flight never reached the tracker
    assert run["rc"] == 0, out[-3000:]
    assert f"loaded checkpoint from {save}/iter_0000002 at iteration 2" in out
    assert _iterations(out) == [3]
    # the relaunch's save cleared what the killed one left, and every checkpoint verifies
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "iter_0000002", "iter_0000003",
                                                      "latest_checkpointed_iteration.txt"]
    from mm.ckpt import verify_checkpoint

    assert [verify_checkpoint(save / f"iter_{i:07d}").iteration for i in (1, 2, 3)] == [1, 2, 3]
    lost = run["trained_before_kill"] - 2
    print(f"measured: job SIGKILLed while saving iteration 3: relaunch resumed from iteration 2 and finished in "
          f"{run['seconds']:.1f} s; steps lost {lost} (trained before the kill: {run['trained_before_kill']})")


def _damage_checkpoint(path: Path, damage: str) -> Path:
    """Damage ``path`` (a torch_dist checkpoint); returns the damaged file."""
    if damage == "truncated_metadata":
        damaged = path / ".metadata"
        damaged.write_bytes(damaged.read_bytes()[:2000])
    else:  # a data file lost
        damaged = path / "__1_0.distcp"
        damaged.unlink()
    return damaged


@pytest.mark.parametrize("damage", ["truncated_metadata", pytest.param("missing_shard", marks=pytest.mark.extended)])
def test_damaged_latest_checkpoint(tmp_path, quickstart, killed_and_resumed, damage):
    """The newest checkpoint damaged: --load stops with one error naming the directory and the file
    (before: ``AssertionError: metadata is None`` in every rank's traceback); with --load-fallback
    the run resumes from the checkpoint before it and trains on."""
    save = tmp_path / "ckpt"
    shutil.copytree(killed_and_resumed()["save"], save)
    damaged = _damage_checkpoint(save / "iter_0000003", damage)
    flags = ("--save", str(save), "--load", str(save), "--save-interval", "1")
    rc, out, detect = _launch(quickstart, tmp_path / "refused.log", *flags, iters=4)
    assert rc == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith(f"{SCRIPT}: error:")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"{SCRIPT}: error: --load {save}: {save}/iter_0000003 is damaged: {damaged}")
    assert "--load-fallback" in errors[0]
    assert not OUR_TRACEBACK.search(out), out[-3000:]
    assert _iterations(out) == []

    rc, out, seconds = _launch(quickstart, tmp_path / "fallback.log", *flags, "--load-fallback", iters=4)
    assert rc == 0, out[-3000:]
    assert re.search(rf"WARNING: --load {save}: {save}/iter_0000003 is damaged: {re.escape(str(damaged))}", out)
    assert f"--load-fallback: loading {save}/iter_0000002 (iteration 2)" in out
    assert f"loaded checkpoint from {save}/iter_0000002 at iteration 2" in out
    assert _iterations(out) == [3, 4]
    # the damaged checkpoint was replaced by the new save of iteration 3
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    from mm.ckpt import verify_checkpoint

    assert verify_checkpoint(save / "iter_0000003").iteration == 3
    print(f"measured: {damage} in the latest checkpoint: refused after {detect:.1f} s (exit 1); with "
          f"--load-fallback resumed from iteration 2 in a {seconds:.1f} s run; steps lost 1")
