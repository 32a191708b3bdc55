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
TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC    nccl   seconds before torch's watchdog monitor kills a stuck
                                           process; raise it for very long collectives (as for
                                           Step-Video-T2V's parallel inference)
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
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

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


def check_comm_env(backend: str, timeout_minutes: int, environ: Mapping[str, str] | None = None) -> list[str]:
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


def init_distributed(accelerator: Accelerator, timeout_minutes: int, launch: LaunchEnv | None = None) -> LaunchEnv:
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
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank0_print(*args: object) -> None:
    """print() on global rank 0 only (every rank before the process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


__all__ = [
    "LAUNCH_VARS",
    "LaunchEnv",
    "LaunchError",
    "check_comm_env",
    "destroy_distributed",
    "init_distributed",
    "rank0_print",
    "read_launch_env",
]
