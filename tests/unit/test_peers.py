"""wait_for_peers: ranks wait for a slower peer without a pending collective, for longer than the
group's timeout while the peer's heartbeat goes on, and fail naming the peer once it stops."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.dist_helper import run_distributed


def _late_rank(rank: int, world: int) -> dict:
    from mm.accelerator import start_heartbeat, stop_heartbeat, wait_for_peers

    start_heartbeat(every=0.2)
    # the control: a barrier of a group with a 2-second timeout does not survive a peer 4 s late
    short = dist.new_group(list(range(world)), timeout=timedelta(seconds=2))
    if rank == 1:
        time.sleep(4.0)
    try:
        dist.barrier(group=short)
        barrier_failed = False
    except RuntimeError:
        barrier_failed = True
    dist.barrier()  # both past the control
    if rank == 1:
        time.sleep(6.0)  # three times the wait's silence limit, heartbeat beating
    begin = time.monotonic()
    wait_for_peers("the phase", silence=2.0)
    waited = time.monotonic() - begin
    begin = time.monotonic()
    wait_for_peers("the phase", silence=2.0)  # the same phase again: a wait of its own
    again = time.monotonic() - begin
    stop_heartbeat()
    return {"barrier_failed": barrier_failed, "waited": waited, "again": again}


def test_a_rank_waits_for_a_late_peer_past_the_timeout_while_it_beats():
    results = run_distributed(2, _late_rank, timeout=120)
    assert results[0]["barrier_failed"], "the control barrier should have timed out on rank 0"
    assert results[0]["waited"] > 5.0, results  # it waited the whole 6 s, not the 2 s limit
    assert results[1]["waited"] < 1.0, results
    assert results[0]["again"] < 1.0 and results[1]["again"] < 1.0, results


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stopping_rank(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        from mm.accelerator import PeerWaitError, init_distributed, select_accelerator, start_heartbeat, wait_for_peers

        init_distributed(select_accelerator("cpu"), timeout_minutes=5)
        start_heartbeat(every=0.2)
        dist.barrier()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # the heartbeat stops with the whole process
        begin = time.monotonic()
        try:
            wait_for_peers("the phase", silence=2.0)
            queue.put((rank, "returned", time.monotonic() - begin))
        except PeerWaitError as e:
            queue.put((rank, str(e), time.monotonic() - begin))
    except BaseException as e:  # noqa: BLE001
        queue.put((rank, f"failed: {e!r}", 0.0))
    queue.close()
    queue.join_thread()  # the message is out before the exit
    os._exit(0)  # no teardown: the peer is stopped


def test_a_stopped_peer_ends_the_wait_with_its_rank():
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_stopping_rank, args=(r, 2, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, message, waited = queue.get(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=10)
    assert rank == 0, message
    assert "rank(s) 1 gave no sign of life for 2 s" in message and "1 of 2 ranks had not arrived" in message, message
    assert 2.0 <= waited < 30.0, waited
    assert not any(p.is_alive() for p in procs)


def test_without_a_process_group_the_wait_returns():
    from mm.accelerator import wait_for_peers

    assert not dist.is_initialized()
    wait_for_peers("nothing")  # a world of one: nothing to wait for


@pytest.mark.parametrize("world", [3])
def test_every_rank_arrives(world):
    def body(rank, world):
        from mm.accelerator import start_heartbeat, stop_heartbeat, wait_for_peers

        start_heartbeat(every=0.2)
        time.sleep(0.3 * rank)
        wait_for_peers("a")
        wait_for_peers("b")
        stop_heartbeat()
        return rank

    assert run_distributed(world, body, timeout=120) == list(range(world))
