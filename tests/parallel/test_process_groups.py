"""Live process groups on gloo (2, 4 and 8 CPU processes) against the pure layouts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mm.parallel.groups import MM_GROUP_BUILDERS, ParallelSizes, all_layouts, group_of
from tests.dist_helper import run_distributed

LAYOUTS = {
    2: [dict(tensor_parallel=2), dict(context_parallel=2, cp_window_size=2), dict(pipeline_parallel=2)],
    4: [dict(context_parallel=4, ulysses_degree=2), dict(tensor_parallel=2, context_parallel=2, vae_cp_size=2),
        dict(pipeline_parallel=2, context_parallel=2)],
    8: [dict(context_parallel=8, ulysses_degree=4), dict(tensor_parallel=2, context_parallel=4, ulysses_degree=2),
        dict(context_parallel=8, cp_window_size=2), dict(tensor_parallel=2, pipeline_parallel=2, context_parallel=2)],
}


def _groups_worker(rank: int, world: int):
    from megatron.core import parallel_state as mpu

    from mm.parallel import destroy_parallel, get_group, get_group_ranks, initialize_parallel

    megatron_getters = {
        "tp": mpu.get_tensor_model_parallel_group, "pp": mpu.get_pipeline_model_parallel_group,
        "cp": mpu.get_context_parallel_group, "dp": mpu.get_data_parallel_group,
        "tp_cp": mpu.get_tensor_and_context_parallel_group,
    }
    seen = []
    for kwargs in LAYOUTS[world]:
        sizes = ParallelSizes(world_size=world, **kwargs)
        initialize_parallel(sizes)
        layouts = all_layouts(sizes)
        for name, getter in megatron_getters.items():
            assert dist.get_process_group_ranks(getter()) == group_of(layouts[name], rank), (kwargs, name)
        for name in MM_GROUP_BUILDERS:
            expected = group_of(layouts[name], rank)
            assert get_group_ranks(name) == expected, (kwargs, name)
            group = get_group(name)
            if len(expected) == 1:
                assert group is None
                continue
            assert dist.get_process_group_ranks(group) == expected, (kwargs, name)
            # the group is live: a sum over it sees exactly its members
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=group)
            assert total.item() == sum(expected), (kwargs, name)
        seen.append(kwargs)
        destroy_parallel()
    return seen


@pytest.mark.parametrize("world", [2, 4, 8])
def test_live_groups_match_layouts(world):
    results = run_distributed(world, _groups_worker)
    assert all(r == LAYOUTS[world] for r in results)
