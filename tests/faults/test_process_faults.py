"""Processes, collectives and timeouts: ranks of a real 2-process training killed (SIGKILL) or
stopped (SIGSTOP), the whole job killed; what is left of the processes, what the surviving rank
says and how soon, and what a relaunch with --load trains.

Every test is also checked for processes it leaves behind (``conftest.no_orphans``).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.faults import jobs
from tests.faults.conftest import train_args

SCRIPT = "pretrain_t2v.py"
ITERS = 10
# the groups a training step of the 2-rank (DP = 2) run has collectives in: DDP's gradient all-reduce,
# the loss's average, the trainer's FLOPs / NaN all-reduce over every rank
STEP_GROUPS = {"DATA_PARALLEL_GROUP_WITH_CP", "DATA_PARALLEL_GROUP", "default_pg"}
# the last rank logs the iterations (megatron's print_rank_last)
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| loss: (\S+) \|")


def losses(output: str) -> dict[int, str]:
    """Logged loss of each iteration, as printed."""
    return {int(i): loss for i, loss in LOSS.findall(output)}


@pytest.fixture(scope="module")
def reference(quickstart, tmp_path_factory):
    """The losses of the uninterrupted run."""
    log = tmp_path_factory.mktemp("reference") / "train.log"
    rc, out = jobs.run(jobs.torchrun(2, SCRIPT, *train_args(quickstart, iters=ITERS)), log)
    assert rc == 0, out[-3000:]
    found = losses(out)
    assert sorted(found) == list(range(1, ITERS + 1)), out[-3000:]
    return found


def _exit_within(job: jobs.Job, seconds: float) -> tuple[int, float]:
    """(exit code, seconds from now to the exit) of a job that must end within ``seconds``."""
    start = time.monotonic()
    rc = job.wait(timeout=seconds)
    return rc, time.monotonic() - start


def test_rank_killed_after_a_save_leaves_no_process_and_the_relaunch_trains_the_same_losses(
        quickstart, tmp_path, reference):
    """SIGKILL of one rank mid-training, after a checkpoint was saved: torchrun stops the other rank,
    no helper process survives (megatron-core's torch_dist writer started a Manager server and a
    resource tracker per rank at the first save); relaunched with --load, the run resumes from the
    last complete checkpoint and logs the uninterrupted run's losses."""
    before = set(jobs.children())
    ckpt = tmp_path / "ckpt"
    args = train_args(quickstart, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2", iters=ITERS)
    job = jobs.Job(jobs.torchrun(2, SCRIPT, *args), tmp_path / "killed.log").start()
    try:
        job.wait_for(r"iteration\s+3/", timeout=240)  # after the save of iteration 2
        os.kill(job.ranks(SCRIPT)[-1], signal.SIGKILL)
        rc, took = _exit_within(job, 60)
    finally:
        job.stop()
    assert rc != 0
    assert not jobs.survivors(before), "processes outlived the job"
    before_kill = losses(job.output())
    assert before_kill and max(before_kill) < ITERS, "the kill came after the run's end"
    print(f"job ended {took:.1f} s after the kill, at iteration {max(before_kill)}")

    rc, out = jobs.run(jobs.torchrun(2, SCRIPT, *args), tmp_path / "resumed.log")
    assert rc == 0, out[-3000:]
    resumed = int(re.search(r"loaded checkpoint from \S+ at iteration (\d+)", out).group(1))
    assert resumed >= 2 and resumed % 2 == 0
    after = losses(out)
    assert sorted(after) == list(range(resumed + 1, ITERS + 1))
    assert after == {i: reference[i] for i in after}
    print(f"resumed at iteration {resumed}: {max(before_kill) - resumed} iteration(s) trained again")


def _two_nodes(quickstart, tmp_path, *flags: str) -> tuple[jobs.Job, jobs.Job]:
    """A 2-rank training launched as two single-worker nodes: rank 0 on node 0, rank 1 on node 1."""
    port = jobs.free_port()
    args = train_args(quickstart, *flags, iters=100000)
    return tuple(jobs.Job(jobs.torchrun_node(2, n, port, SCRIPT, *args), tmp_path / f"node{n}.log").start()
                 for n in (0, 1))


def _group_named(output: str, during: str) -> re.Match:
    """The survivor's CollectiveError: rank 0, the phase, the group and the peer it waited on."""
    m = re.search(rf"CollectiveError: rank 0: a collective operation failed during {during}, in process group "
                  r"(\w+) \(global ranks \[0, 1\]\), waiting on rank 1, timeout ([\d:.]+): (.*)", output)
    assert m, output[-4000:]
    return m


def test_node_killed_after_a_save_its_rank_dies_and_the_survivor_names_the_group_and_the_peer(quickstart, tmp_path):
    """SIGKILL of node 1's whole job (its torchrun and process group; the worker runs in a session of
    its own) after a checkpoint was saved: rank 1 dies with its torchrun, no helper of either rank
    survives, and rank 0 fails at its next collective with rank 1 and exits non-zero within seconds,
    saying in which iteration, in which process group and that it waited on rank 1."""
    before = set(jobs.children())
    node0, node1 = _two_nodes(quickstart, tmp_path, "--save", str(tmp_path / "ckpt"), "--save-interval", "2")
    try:
        node0.wait_for(r"saved checkpoint at iteration\s+2 ", timeout=240)
        node1.kill(signal.SIGKILL)
        rc, took = _exit_within(node0, 60)
    finally:
        node0.stop()
        node1.stop()
    assert rc != 0
    m = _group_named(node0.output(), r"training iteration \d+")
    assert m.group(1) in STEP_GROUPS, m.group(0)
    assert took < 30, took
    left = jobs.survivors(before)
    assert not left, f"processes outlived the job: {left}"
    print(f"rank 0 exited {took:.1f} s after node 1 was killed: {m.group(0)[:300]}")


@pytest.mark.parametrize("minutes", [0.15, pytest.param(1, marks=pytest.mark.extended)])
def test_peer_stopped_the_survivor_times_out_naming_the_group(quickstart, tmp_path, minutes):
    """SIGSTOP of rank 1: rank 0 waits --distributed-timeout-minutes in its all-reduce, then fails
    naming the group, the peer and the timeout, and exits; the stopped rank is killed afterwards."""
    node0, node1 = _two_nodes(quickstart, tmp_path, "--distributed-timeout-minutes", str(minutes))
    stopped = None
    try:
        node1.wait_for(r"iteration\s+3/", timeout=240)
        stopped = node1.ranks(SCRIPT)[0]
        os.kill(stopped, signal.SIGSTOP)
        rc, took = _exit_within(node0, 60 * minutes + 60)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
            os.kill(stopped, signal.SIGKILL)
        node0.stop()
        node1.stop()
    assert rc != 0
    m = _group_named(node0.output(), r"training iteration \d+")
    assert m.group(1) in STEP_GROUPS and "Timed out" in m.group(3), m.group(0)
    assert 60 * minutes - 1 < took < 60 * minutes + 20, took
    print(f"rank 0 exited {took:.1f} s after rank 1 was stopped (timeout {60 * minutes:.0f} s)")


@pytest.mark.extended
def test_whole_job_killed_after_a_save_leaves_no_process(quickstart, tmp_path):
    """SIGKILL of a single-node job's torchrun and its process group (the workers run in sessions of
    their own): every worker dies with torchrun, and with it every helper. (The default run covers
    the same through one node of two.)"""
    before = set(jobs.children())
    # a run far from its end: workers that outlive torchrun would still be training when counted
    args = train_args(quickstart, "--save", str(tmp_path / "ckpt"), "--save-interval", "2", iters=100000)
    job = jobs.Job(jobs.torchrun(2, SCRIPT, *args), tmp_path / "killed.log").start()
    try:
        job.wait_for(r"saved checkpoint at iteration\s+2 ", timeout=240)
        assert len(job.ranks(SCRIPT)) == 2
        job.kill(signal.SIGKILL)
        job.wait(30)
    finally:
        job.stop()
    left = jobs.survivors(before)
    assert not left, f"processes outlived torchrun: {left}"
