"""Run a function on N CPU processes over gloo, as torchrun would, and collect what each returns.

Workers are forked (fast: they inherit the imported torch and megatron-core) with torchrun's
environment variables set, select the CPU accelerator and start the default process group through
mm.accelerator, exactly as the entry points do. An exception on any rank fails the call with that
rank's traceback; a rank that exits without a result fails it at once, one that does not finish
within ``timeout`` seconds at the timeout.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        from mm.accelerator import init_distributed, select_accelerator

        init_distributed(select_accelerator("cpu"), timeout_minutes=5)
        result = fn(rank, world_size, *args)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # serialise tensors by value: the queue would otherwise pass shared-memory handles that
        # die with this process
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including assertion failures, to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(world_size: int, fn: Callable, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []

    def take(rank: int, ok: bool, value: Any) -> None:
        if ok:
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            failures.append(f"rank {rank} failed:\n{value}")

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not failures:
            try:
                take(*queue.get(timeout=1.0))
                continue
            except queue_module.Empty:
                pass
            # a rank that died without reporting (a C++ abort, a signal) fails the call now, not at the timeout
            if any(r not in results and p.exitcode is not None for r, p in enumerate(procs)):
                time.sleep(1.0)  # a report put just before the exit may still be in the pipe
                while not failures and not queue.empty():
                    take(*queue.get())
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead and not failures:
                    failures.append(f"ranks {dead} exited without a result (exit codes "
                                    f"{[procs[r].exitcode for r in dead]})")
            elif time.monotonic() > deadline:
                failures.append(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish in {timeout}s")
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.1)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]
