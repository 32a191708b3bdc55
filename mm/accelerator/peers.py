"""Waiting for the other ranks without a pending collective.

A rank that finishes a phase early and meets its peers in a collective (a barrier, the first
receive of a pipeline, a broadcast) waits inside the communication library, which gives up after
``--distributed-timeout-minutes`` (and NCCL's watchdog ends the process), however healthy the
ranks it waits for are. Where one rank may legitimately work far longer than the others (stage 0
loading the encoders while later pipeline stages are ready, a data-parallel replica that samples
one prompt more than the others, rank 0 clearing a failed save), mm waits here instead:

* every rank runs a heartbeat (``start_heartbeat``): a daemon thread that bumps a counter of its
  own in the default group's key-value store every few seconds, from the start of the run to its
  end; it keeps beating while the main thread computes or reads files;
* ``wait_for_peers(phase)`` counts the ranks that reached ``phase`` in the store and sleeps until
  all have. No collective is pending meanwhile, so the wait has no time limit of its own; it ends
  with ``PeerWaitError`` only when a rank that has not arrived shows no heartbeat for the group's
  timeout (it died, was stopped, or hangs holding the interpreter), naming that rank. Rank 0
  says every few minutes whom it is still waiting for.

Where the default group has no store (a world of one, a backend without one) the wait is a plain
barrier.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import torch.distributed as dist

from mm.accelerator.distributed import _ranks_text, group_timeout

_PREFIX = "mm/peers"
BEAT_S = 2.0  # seconds between heartbeats
REPORT_S = 300.0  # seconds between rank 0's notes on whom it waits for

_arrivals: Counter = Counter()  # phase -> how many times this rank waited at it
_beat: _Heartbeat | None = None


class PeerWaitError(RuntimeError):
    """A rank waited for in ``wait_for_peers`` died or stopped (no heartbeat for the timeout)."""


def _store():
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _beat_key(rank: int) -> str:
    return f"{_PREFIX}/beat/{rank}"


class _Heartbeat:
    def __init__(self, store, rank: int, every: float):
        self.store, self.rank, self.every = store, rank, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mm-heartbeat", daemon=True)

    def _run(self) -> None:
        key = _beat_key(self.rank)
        while not self.stopped.is_set():
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 -- the store is gone (the run is ending or rank 0 died)
                return
            self.stopped.wait(self.every)


def start_heartbeat(every: float = BEAT_S) -> bool:
    """Start this rank's heartbeat (once; after the default group started). False where there is
    no store to beat in."""
    global _beat
    store = _store()
    if store is None or _beat is not None:
        return _beat is not None
    _beat = _Heartbeat(store, dist.get_rank(), every)
    _beat.store.add(_beat_key(_beat.rank), 1)
    _beat.thread.start()
    return True


def stop_heartbeat() -> None:
    global _beat
    if _beat is not None:
        _beat.stopped.set()
        _beat.thread.join(timeout=2 * _beat.every)
        _beat = None


def _group_timeout() -> float:
    try:
        return group_timeout().total_seconds()
    except (ValueError, AttributeError, RuntimeError):
        return timedelta(minutes=10).total_seconds()


def wait_for_peers(phase: str, silence: float | None = None, poll: float = 0.05) -> None:
    """Return when every rank has called ``wait_for_peers(phase)`` as often as this one; see the
    module's text. ``silence``: seconds without a heartbeat after which a rank that has not arrived
    is taken for dead (default: the default group's timeout, ``--distributed-timeout-minutes``)."""
    store = _store()
    if store is None or dist.get_world_size() == 1:
        if dist.is_initialized():
            dist.barrier()
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    silence = _group_timeout() if silence is None else silence
    generation = _arrivals[phase]
    _arrivals[phase] += 1
    key = f"{_PREFIX}/{phase}/{generation}"
    store.set(f"{key}/{rank}", "1")
    store.add(f"{key}/count", 1)
    start = last_check = last_report = time.monotonic()
    beats: dict[int, tuple[int, float]] = {}  # rank -> (its last beat count seen, when it changed)
    interval = min(BEAT_S, silence / 4)
    while store.add(f"{key}/count", 0) < world:
        time.sleep(poll)
        poll = min(poll * 1.5, 0.5)
        now = time.monotonic()
        if now - last_check < interval:
            continue
        last_check = now
        missing = [r for r in range(world) if not store.check([f"{key}/{r}"])]
        for r in missing:
            count = store.add(_beat_key(r), 0)
            if r not in beats or beats[r][0] != count:
                beats[r] = (count, now)
        silent = [r for r in missing if now - beats[r][1] > silence]
        if silent:
            raise PeerWaitError(
                f"rank {rank}: waiting for every rank to reach {phase}: rank(s) {_ranks_text(silent)} gave no sign "
                f"of life for {silence:.0f} s (--distributed-timeout-minutes): dead, stopped or hung; "
                f"{len(missing)} of {world} ranks had not arrived after {now - start:.0f} s")
        if rank == 0 and now - last_report > REPORT_S:
            last_report = now
            print(f"mm: waiting for rank(s) {_ranks_text(missing)} to reach {phase} ({now - start:.0f} s so far; "
                  f"they are alive)", flush=True)
