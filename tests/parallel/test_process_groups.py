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


# one layout per group mm creates with more than one rank: Ulysses and ring (hybrid CP), the
# double ring's windows and VAE-CP, CFG pairs (DP = 2), the first stage (every layout: PP = 1)
TIMEOUT_LAYOUTS = [dict(context_parallel=4, ulysses_degree=2, vae_cp_size=2),
                   dict(context_parallel=4, cp_window_size=2), dict(context_parallel=2)]


def _timeouts_worker(rank: int, world: int):
    from datetime import timedelta

    from mm.accelerator import group_timeout
    from mm.parallel import destroy_parallel, initialize_parallel

    assert group_timeout(dist.group.WORLD) == timedelta(minutes=5)  # init_distributed's, in run_distributed
    described = set()
    for kwargs in TIMEOUT_LAYOUTS:
        initialize_parallel(ParallelSizes(world_size=world, **kwargs), timeout_minutes=7.5)
        # every process group this rank is in, whoever created it (megatron-core's, its gloo twins, mm's)
        groups = list(dist.distributed_c10d._world.pg_map)
        assert len(groups) > 10
        for group in groups:
            assert group_timeout(group) == timedelta(minutes=7.5), (kwargs, group.group_desc, group_timeout(group))
            described.add(group.group_desc)
        destroy_parallel()
    return sorted(described)


def test_every_group_waits_the_run_timeout():
    """--distributed-timeout-minutes reaches the default group (init_distributed) and every group
    initialize_parallel creates, megatron-core's (those it creates without a timeout included) and mm's."""
    described = run_distributed(4, _timeouts_worker)
    # each of mm's groups existed with more than one rank on some rank
    for name in MM_GROUP_BUILDERS:
        assert any(f"MM_{name.upper()}_GROUP" in d for d in described), name
    assert any("EXPERT_DATA_PARALLEL_GROUP_GLOO" in d for d in described)


def _set_up_and_tear_down(rank: int, world: int):
    from megatron.core import parallel_state as mpu

    from mm.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, context_parallel=world), seed=0)
    destroy_parallel()
    return sorted(name for name, value in vars(mpu).items() if isinstance(value, dist.ProcessGroup))


def test_a_process_forked_after_a_torn_down_parallel_state_sets_up_its_own():
    """mm-plan builds megatron-core's parallel state in the caller's process and tears it down; a
    group left referenced by a module global would be inherited by a forked child, and its
    destructor there joins threads the fork did not copy: the child hangs."""
    from mm.plan.memory import single_process_groups

    with single_process_groups():
        pass
    assert not dist.is_initialized()
    # the forked ranks set up CP groups (megatron's intra-partial DP groups with CP among them),
    # tear them down, and no module global of megatron-core's parallel state still holds a group
    assert run_distributed(2, _set_up_and_tear_down, timeout=60) == [[], []]


def _dynamic_cp_worker(rank: int, world: int):
    """Dynamic DP/CP's layouts on live groups: swapped for a step, restored after it; batches exchanged."""
    from megatron.core import parallel_state as mpu

    from mm.parallel import destroy_parallel, get_group, get_group_ranks, initialize_parallel
    from mm.parallel import dynamic_cp

    sizes = ParallelSizes(world_size=world, context_parallel=2)
    initialize_parallel(sizes, dynamic_max_cp=4)
    assert dynamic_cp.degrees() == [1, 2, 4]
    static = (mpu.get_context_parallel_world_size(), mpu.get_data_parallel_world_size(), get_group_ranks("ulysses"))
    for cp in dynamic_cp.degrees():
        layout = dynamic_cp.strategy_groups(sizes, cp)
        with dynamic_cp.use_strategy(cp):
            assert dynamic_cp.context_parallel_size(2) == cp
            assert dist.get_process_group_ranks(mpu.get_context_parallel_group()) == group_of(layout["cp"], rank)
            assert dist.get_process_group_ranks(mpu.get_data_parallel_group()) == group_of(layout["dp"], rank)
            assert mpu.get_context_parallel_rank() == rank % cp
            assert get_group_ranks("ulysses") == group_of(layout["cp"], rank)
            assert (get_group("ulysses") is None) == (cp == 1)
            # the DP x CP group (DDP's gradient reduction) stays the whole run's
            assert mpu.get_data_parallel_world_size(with_context_parallel=True) == world
            group, ranks = dynamic_cp.cp_group_of_strategy(cp)
            own = [{"latents": torch.full((1, 2, rank + 1), float(rank)), "path": [f"clip{rank}"], "condition": None,
                    "context": [torch.arange(3) + rank], "skipped": [("x.mp4", "decode")] if rank == 0 else []}]
            members = dynamic_cp.exchange_batches(own, group if cp > 1 else None, ranks, torch.device("cpu"))
            for member, (batches,) in zip(ranks, members):
                assert batches["latents"].shape == (1, 2, member + 1) and bool((batches["latents"] == member).all())
                assert batches["path"] == [f"clip{member}"] and batches["condition"] is None
                assert torch.equal(batches["context"][0], torch.arange(3) + member)
                assert batches["skipped"] == ([("x.mp4", "decode")] if member == 0 else [])
        assert dynamic_cp.context_parallel_size(2) == 2
        assert (mpu.get_context_parallel_world_size(), mpu.get_data_parallel_world_size(),
                get_group_ranks("ulysses")) == static
    destroy_parallel()
    assert dynamic_cp.degrees() == []
    return True


def test_dynamic_dpcp_layouts_swap_and_restore_the_groups():
    assert all(run_distributed(4, _dynamic_cp_worker))
