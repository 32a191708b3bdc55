"""The default process group: read torchrun's environment, check the communication knobs, start it.

torchrun (and the example scripts that call it on every node) export RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A plain ``python`` launch has none of
them and runs as a world of one.

Communication knobs honoured from the environment (they are read by NCCL/HCCL/torch themselves;
mm validates the ones with documented ranges before the group starts and warns where they would
cut a collective shorter than ``--distributed-timeout-minutes``):

==================================  =====  ==========================================================
variable                            for    meaning
==================================  =====  ==========================================================
TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC    nccl   seconds torch's monitor lets NCCL's watchdog thread go
                                           without a heartbeat (stuck in a CUDA/NCCL call) before it
                                           kills the process; raise it with long single-rank phases
                                           (as for Step-Video-T2V's parallel inference)
TORCH_NCCL_ENABLE_MONITORING        nccl   0 disables that monitor (last resort; Step-Video-T2V)
TORCH_NCCL_ASYNC_ERROR_HANDLING     nccl   how a timed-out collective ends the process
NCCL_DEBUG, NCCL_DEBUG_SUBSYS       nccl   NCCL logging (INFO / ALL when debugging hangs)
NCCL_SOCKET_IFNAME                  nccl   network interface for bootstrap and sockets (eth0 ...)
NCCL_IB_DISABLE, NCCL_IB_GID_INDEX  nccl   InfiniBand/RoCE selection for multi-node runs
                                           (MindSpeed-MM's Wan2.2-I2V-A14B training)
CUDA_DEVICE_MAX_CONNECTIONS         nccl   1 is what megatron-core expects when TP/SP communication
                                           overlaps compute; the example scripts export it
HCCL_CONNECT_TIMEOUT                hccl   seconds to establish links, integer in [120, 7200]
HCCL_EXEC_TIMEOUT                   hccl   seconds a device waits in a collective, integer in
                                           [68, 17340] (default 1800)
HCCL_BUFFSIZE                       hccl   MB of buffer per communicator
==================================  =====  ==========================================================

Every process group, the default one and each ``new_group`` of megatron-core and of mm, waits
``--distributed-timeout-minutes`` for its peers (``group_timeout`` reads it back). A failed or
timed-out collective inside ``naming_collective_failures`` is raised again as a ``CollectiveError``
that names this rank, the phase of the run and the process group (its description and global
ranks) the operation ran in. Under torchrun, ``die_with_launcher`` makes a worker die with its
launcher, so a killed torchrun leaves no rank behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch.distributed as dist

from mm.accelerator.device import Accelerator

logger = logging.getLogger(__name__)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# name -> (backend it concerns, inclusive integer range or None)
_INT_KNOBS: dict[str, tuple[str, tuple[int, int] | None]] = {
    "HCCL_CONNECT_TIMEOUT": ("hccl", (120, 7200)),
    "HCCL_EXEC_TIMEOUT": ("hccl", (68, 17340)),
    "HCCL_BUFFSIZE": ("hccl", (1, 1 << 20)),
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": ("nccl", (1, 1 << 31)),
    "TORCH_NCCL_ENABLE_MONITORING": ("nccl", (0, 1)),
    "CUDA_DEVICE_MAX_CONNECTIONS": ("nccl", (1, 32)),
}


class LaunchError(RuntimeError):
    """The launch environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank layout from torchrun's variables; a world of one when none of them is set."""
    environ = os.environ if environ is None else environ
    present = [v for v in LAUNCH_VARS if v in environ]
    if not present:
        return LaunchEnv(0, 1, 0, 1, "127.0.0.1", _free_port())
    missing = [v for v in LAUNCH_VARS if v not in environ]
    if missing:
        raise LaunchError(
            f"launch environment incomplete: {', '.join(present)} set but {', '.join(missing)} "
            "missing; start with torchrun (see examples/*/pretrain_*.sh) or set all of "
            + ", ".join(LAUNCH_VARS)
        )
    rank, world, local_rank = (_int_var(environ, v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"LOCAL_RANK={local_rank} is outside [0, LOCAL_WORLD_SIZE={local_world})")
    return LaunchEnv(rank, world, local_rank, local_world, environ["MASTER_ADDR"],
                     _int_var(environ, "MASTER_PORT"))


def check_comm_env(backend: str, timeout_minutes: float, environ: Mapping[str, str] | None = None) -> list[str]:
    """Validate the communication knobs for ``backend``; returns warnings, raises on bad values."""
    environ = os.environ if environ is None else environ
    warnings: list[str] = []
    values: dict[str, int] = {}
    for name, (knob_backend, bounds) in _INT_KNOBS.items():
        if name not in environ or knob_backend != backend:
            continue
        raw = environ[name]
        try:
            values[name] = int(raw)
        except ValueError:
            raise LaunchError(f"environment variable {name}={raw!r} must be an integer") from None
        if bounds is not None and not bounds[0] <= values[name] <= bounds[1]:
            raise LaunchError(
                f"environment variable {name}={values[name]} is outside its valid range [{bounds[0]}, {bounds[1]}]"
            )
    timeout_s = timeout_minutes * 60
    if backend == "hccl":
        exec_timeout = values.get("HCCL_EXEC_TIMEOUT", 1800)
        if exec_timeout < timeout_s:
            warnings.append(
                f"HCCL_EXEC_TIMEOUT={exec_timeout}s is shorter than --distributed-timeout-minutes="
                f"{timeout_minutes} ({timeout_s}s): HCCL will abort a slow collective first"
            )
    if backend == "nccl" and environ.get("TORCH_NCCL_ENABLE_MONITORING") == "0":
        warnings.append("TORCH_NCCL_ENABLE_MONITORING=0: a hung rank will not be killed by the watchdog monitor")
    return warnings


def init_distributed(accelerator: Accelerator, timeout_minutes: float, launch: LaunchEnv | None = None) -> LaunchEnv:
    """Start the default process group for ``accelerator`` (idempotent) and bind the local device."""
    launch = read_launch_env() if launch is None else launch
    for message in check_comm_env(accelerator.backend, timeout_minutes):
        logger.warning(message)
    if not accelerator.is_cpu:
        if launch.local_rank >= accelerator.device_count():
            raise LaunchError(
                f"LOCAL_RANK={launch.local_rank} but this node has {accelerator.device_count()} "
                f"{accelerator.name} device(s); lower --nproc_per_node / GPUS_PER_NODE"
            )
        accelerator.set_device(launch.local_rank)
    if dist.is_initialized():
        if dist.get_world_size() != launch.world_size:
            raise LaunchError(
                f"a process group of {dist.get_world_size()} ranks already exists, launch says {launch.world_size}"
            )
        return launch
    dist.init_process_group(
        backend=accelerator.backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        world_size=launch.world_size,
        rank=launch.rank,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return launch


def destroy_distributed() -> None:
    """The end of a run: wait for every rank without a pending collective (``wait_for_peers``: a
    data-parallel replica with one prompt more to sample may take minutes longer), then a barrier
    (no rank tears the store down while another still reads it) and the groups' end."""
    from mm.accelerator.peers import stop_heartbeat, wait_for_peers

    if dist.is_initialized():
        wait_for_peers("the end of the run")
        stop_heartbeat()
        dist.barrier()
        dist.destroy_process_group()


PR_SET_PDEATHSIG = 1


def die_with_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """In a worker torchrun started (``TORCHELASTIC_RUN_ID`` set), have Linux send this process
    SIGKILL when its parent, the torchrun agent, dies (``PR_SET_PDEATHSIG``): a torchrun killed with
    SIGKILL cannot stop its workers itself, and they would run on (or wait in a collective) without
    it. True where that was set. A launcher that died before this call is not noticed."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in environ or not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def group_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """How long an operation of ``group`` (default: the default group) waits for its peers, as its
    backend was created with."""
    group = dist.group.WORLD if group is None else group
    for device in group._device_types:
        return group._get_backend(device).options._timeout
    raise ValueError(f"process group {describe_group(group)} has no backend")


def _ranks_text(ranks: list[int]) -> str:
    """``0, 1, 2``; a long list shortened to its first 8 and last 4 ranks."""
    if len(ranks) <= 16:
        return ", ".join(map(str, ranks))
    return f"{', '.join(map(str, ranks[:8]))}, ..., {', '.join(map(str, ranks[-4:]))} ({len(ranks)} ranks)"


def describe_group(group: dist.ProcessGroup | None) -> str:
    """``NAME (global ranks [...])`` of a process group (None: the default group)."""
    group = dist.group.WORLD if group is None else group
    ranks = dist.get_process_group_ranks(group)
    return f"{getattr(group, 'group_desc', None) or 'group ' + group.group_name} (global ranks [{_ranks_text(ranks)}])"


class CollectiveError(RuntimeError):
    """A collective or point-to-point operation failed: a peer died, was stopped or took longer than
    --distributed-timeout-minutes."""


# a communication library's error; what one says when a peer's connection or the wait for it ends
_COMM_LIBRARY = re.compile(r"gloo|nccl|hccl", re.IGNORECASE)
_COMM_FAILURE = re.compile(r"connection (closed|reset|refused)|timed out|broken pipe", re.IGNORECASE)


def _in_torch_distributed(frame) -> bool:
    return "torch/distributed/" in frame.f_code.co_filename.replace("\\", "/")


def _comm_failure(exc: BaseException) -> BaseException | None:
    """``exc`` or the exception it was raised from that a process group's operation raised: torch's
    DistError, a RuntimeError naming gloo/NCCL/HCCL, or one saying a connection ended or a wait timed
    out raised inside torch.distributed (any other exception is not taken for one)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
        if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and (
                _COMM_LIBRARY.search(str(exc))
                or (_COMM_FAILURE.search(str(exc)) and frames and _in_torch_distributed(frames[-1])))):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _groups_in_frames(exc: BaseException) -> list[dist.ProcessGroup | None]:
    """The process groups the innermost frame of ``exc``'s traceback that holds any was working
    with (a ProcessGroup among its locals, or the groups of point-to-point operations); None stands
    for the default group of a torch.distributed call given no group."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for frame in reversed(frames):
        found: list[dist.ProcessGroup | None] = []
        for value in frame.f_locals.values():
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                group = item.group if isinstance(item, dist.P2POp) else item
                if isinstance(group, dist.ProcessGroup) and group not in found:
                    found.append(group)
                elif isinstance(item, dist.P2POp) and group is None and None not in found:
                    found.append(None)
        if not found and _in_torch_distributed(frame) and frame.f_locals.get("group", 0) is None:
            found.append(None)
        if found:
            return found
    return []


def collective_error(exc: BaseException, during: str) -> CollectiveError | None:
    """A ``CollectiveError`` naming this rank, ``during`` (the phase of the run) and the process
    group(s) of the failed operation, when ``exc`` is a communication failure; else None."""
    failure = _comm_failure(exc)
    if failure is None or not dist.is_initialized():
        return None
    rank = dist.get_rank()
    groups = _groups_in_frames(failure)
    if groups:
        where = []
        for group in groups:
            ranks = dist.get_process_group_ranks(dist.group.WORLD if group is None else group)
            peers = [r for r in ranks if r != rank]
            waiting = f", waiting on rank {peers[0]}" if len(peers) == 1 else \
                f", waiting on ranks {_ranks_text(peers)}" if peers else ""
            where.append(f"{describe_group(group)}{waiting}, timeout {group_timeout(group)}")
        place = "in process group " + "; ".join(where)
    else:
        place = "in a process group this rank could not tell (an asynchronous or point-to-point operation)"
    first_line = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    return CollectiveError(
        f"rank {rank}: a collective operation failed during {during}, {place}: {type(failure).__name__}: "
        f"{first_line}. A peer rank died, was stopped, or did not reach the same operation within "
        "--distributed-timeout-minutes; its own log (or the launcher's) tells which and why.")


@contextmanager
def naming_collective_failures(during: str) -> Iterator[None]:
    """Raise a communication failure inside the block as a ``CollectiveError`` (see
    ``collective_error``); anything else passes through unchanged."""
    try:
        yield
    except CollectiveError:
        raise
    except Exception as e:
        error = collective_error(e, during)
        if error is None:
            raise
        raise error from e


def rank0_print(*args: object) -> None:
    """print() on global rank 0 only (every rank before the process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


__all__ = [
    "CollectiveError",
    "LAUNCH_VARS",
    "LaunchEnv",
    "LaunchError",
    "check_comm_env",
    "collective_error",
    "describe_group",
    "destroy_distributed",
    "die_with_launcher",
    "group_timeout",
    "init_distributed",
    "naming_collective_failures",
    "rank0_print",
    "read_launch_env",
]
