"""Layer 2: process groups (megatron-core's plus mm's CP sub-groups) and, later, CP attention."""

from mm.parallel.groups import ParallelSizes, all_layouts, describe_layout
from mm.parallel.state import (
    destroy_parallel,
    get_encoder_dp_group,
    get_group,
    get_group_ranks,
    get_parallel_sizes,
    initialize_parallel,
)

__all__ = [
    "ParallelSizes",
    "all_layouts",
    "describe_layout",
    "destroy_parallel",
    "get_encoder_dp_group",
    "get_group",
    "get_group_ranks",
    "get_parallel_sizes",
    "initialize_parallel",
]
