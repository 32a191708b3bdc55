"""Layer 1: which device and process-group backend a process uses, and how the group starts.

The only package in mm that names device types or reads the launch environment.
"""

from mm.accelerator.device import (
    ACCELERATOR_CHOICES,
    ACCELERATOR_ENV,
    BACKENDS,
    Accelerator,
    AcceleratorError,
    backend_accepted,
    get_accelerator,
    select_accelerator,
)
from mm.accelerator.distributed import (
    CollectiveError,
    LaunchEnv,
    LaunchError,
    check_comm_env,
    describe_group,
    destroy_distributed,
    die_with_launcher,
    group_timeout,
    init_distributed,
    naming_collective_failures,
    rank0_print,
    read_launch_env,
)
from mm.accelerator.peers import PeerWaitError, start_heartbeat, stop_heartbeat, wait_for_peers

__all__ = [
    "ACCELERATOR_CHOICES",
    "ACCELERATOR_ENV",
    "BACKENDS",
    "Accelerator",
    "AcceleratorError",
    "CollectiveError",
    "LaunchEnv",
    "LaunchError",
    "PeerWaitError",
    "backend_accepted",
    "check_comm_env",
    "describe_group",
    "destroy_distributed",
    "die_with_launcher",
    "get_accelerator",
    "group_timeout",
    "init_distributed",
    "naming_collective_failures",
    "rank0_print",
    "read_launch_env",
    "select_accelerator",
    "start_heartbeat",
    "stop_heartbeat",
    "wait_for_peers",
]
