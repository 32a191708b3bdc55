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
    LaunchEnv,
    LaunchError,
    check_comm_env,
    destroy_distributed,
    init_distributed,
    rank0_print,
    read_launch_env,
)

__all__ = [
    "ACCELERATOR_CHOICES",
    "ACCELERATOR_ENV",
    "BACKENDS",
    "Accelerator",
    "AcceleratorError",
    "LaunchEnv",
    "LaunchError",
    "backend_accepted",
    "check_comm_env",
    "destroy_distributed",
    "get_accelerator",
    "init_distributed",
    "rank0_print",
    "read_launch_env",
    "select_accelerator",
]
