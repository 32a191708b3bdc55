"""Rank layouts of mm's process groups as pure functions of the parallel sizes."""

from __future__ import annotations

import itertools

import pytest

from mm.parallel.groups import ParallelSizes, all_layouts, describe_layout, group_of, megatron_groups


def test_phantom_ulysses_4_ring_2():
    # 8 GPUs, ulysses 4 x ring 2, as in Phantom's own generate settings
    layouts = all_layouts(ParallelSizes(world_size=8, context_parallel=8, ulysses_degree=4))
    assert layouts["ulysses"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layouts["ring"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_cp_subgroups_follow_megatron_cp_ranks_under_tp():
    # with TP=2 the CP groups are strided by TP; Ulysses/ring split each CP group
    layouts = all_layouts(ParallelSizes(world_size=8, tensor_parallel=2, context_parallel=4, ulysses_degree=2))
    assert layouts["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layouts["cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layouts["ulysses"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert layouts["ring"] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert layouts["tp_cp"] == [[0, 1, 2, 3, 4, 5, 6, 7]]


def test_double_ring_windows():
    layouts = all_layouts(ParallelSizes(world_size=8, context_parallel=8, cp_window_size=2))
    assert layouts["ring"] == [list(range(8))]
    assert layouts["cp_inner_window"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layouts["cp_outer_window"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_vae_cp_groups_stay_inside_ranks_sharing_a_sample():
    layouts = all_layouts(ParallelSizes(world_size=8, tensor_parallel=2, context_parallel=2, vae_cp_size=2))
    assert layouts["vae_cp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layouts["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _valid_sizes(world_sizes=(1, 2, 4, 8, 16)):
    for world in world_sizes:
        for tp, pp, cp in itertools.product((1, 2, 4), (1, 2, 4), (1, 2, 4, 8)):
            if world % (tp * pp * cp):
                continue
            for u in (d for d in (1, 2, 4, 8) if cp % d == 0):
                ring = cp // u
                for w in (d for d in (1, 2, 4) if ring % d == 0):
                    for vae in (d for d in (1, 2, 4) if (tp * cp) % d == 0):
                        yield ParallelSizes(world, tp, pp, cp, u, w, vae)


def _is_partition(groups, world):
    return sorted(r for g in groups for r in g) == list(range(world))


@pytest.mark.parametrize("sizes", list(_valid_sizes()), ids=str)
def test_every_layout_partitions_the_world_consistently(sizes):
    layouts = all_layouts(sizes)
    world = sizes.world_size
    for name, groups in layouts.items():
        assert _is_partition(groups, world), name
    expected_sizes = {"tp": sizes.tensor_parallel, "pp": sizes.pipeline_parallel, "cp": sizes.context_parallel,
                      "dp": sizes.data_parallel, "ulysses": sizes.ulysses_degree, "ring": sizes.ring_degree,
                      "cp_inner_window": sizes.cp_window_size,
                      "cp_outer_window": sizes.ring_degree // sizes.cp_window_size, "vae_cp": sizes.vae_cp_size}
    for name, size in expected_sizes.items():
        assert {len(g) for g in layouts[name]} == {size}, name
    for rank in range(world):
        cp = set(group_of(layouts["cp"], rank))
        uly, ring = set(group_of(layouts["ulysses"], rank)), set(group_of(layouts["ring"], rank))
        # ulysses and ring groups are a grid over the CP group: they meet in exactly this rank
        assert uly <= cp and ring <= cp and uly & ring == {rank}
        assert len(uly) * len(ring) == len(cp)
        cp_list = group_of(layouts["cp"], rank)
        positions = [cp_list.index(r) for r in group_of(layouts["ulysses"], rank)]
        assert positions == list(range(positions[0], positions[0] + len(positions)))  # consecutive CP ranks
        inner, outer = set(group_of(layouts["cp_inner_window"], rank)), set(group_of(layouts["cp_outer_window"], rank))
        assert inner <= ring and outer <= ring and inner & outer == {rank}
        assert set(group_of(layouts["vae_cp"], rank)) <= set(group_of(layouts["tp_cp"], rank))
        # the first-stage group: the ranks of pipeline stage 0, everyone else alone
        first = group_of(layouts["first_stage"], rank)
        on_stage0 = group_of(layouts["pp"], rank)[0] == rank
        assert len(first) == (world // sizes.pipeline_parallel if on_stage0 else 1)
        if on_stage0:
            assert set(group_of(layouts["tp_cp"], rank)) | set(group_of(layouts["dp"], rank)) <= set(first)


def test_megatron_groups_match_megatron_order():
    sizes = ParallelSizes(world_size=16, tensor_parallel=2, pipeline_parallel=2, context_parallel=2)
    assert megatron_groups(sizes, "pp") == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert megatron_groups(sizes, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]


def test_describe_layout_names_every_group():
    text = describe_layout(ParallelSizes(world_size=8, context_parallel=8, ulysses_degree=4), rank=5)
    assert "ulysses          [4, 5, 6, 7]" in text
    assert "ring             [1, 5]" in text


def test_cfg_pairs_are_consecutive_data_parallel_ranks():
    # TP2 x CP2 x DP4 over 16 ranks: DP groups are strided by TP x CP = 4
    sizes = ParallelSizes(world_size=16, tensor_parallel=2, context_parallel=2)
    layouts = all_layouts(sizes)
    assert megatron_groups(sizes, "dp")[0] == [0, 4, 8, 12]
    assert group_of(layouts["cfg"], 0) == [0, 4] and group_of(layouts["cfg"], 8) == [8, 12]
    # partners hold the same TP and CP coordinates
    for pair in layouts["cfg"]:
        assert len(pair) == 2 and pair[1] - pair[0] == 4
    odd = all_layouts(ParallelSizes(world_size=6, tensor_parallel=2))  # DP3: no pairs
    assert all(len(g) == 1 for g in odd["cfg"])


def test_first_stage_group_is_pipeline_stage_0():
    # TP2 x CP2 x PP2 x DP2 over 16 ranks: PP groups are strided by 8, so stage 0 is ranks 0-7
    layouts = all_layouts(ParallelSizes(world_size=16, tensor_parallel=2, pipeline_parallel=2, context_parallel=2))
    assert layouts["first_stage"] == [list(range(8))] + [[r] for r in range(8, 16)]
    assert all_layouts(ParallelSizes(world_size=4, tensor_parallel=2))["first_stage"] == [[0, 1, 2, 3]]
    assert "first_stage      [0, 1, 2, 3]" in describe_layout(ParallelSizes(world_size=4, tensor_parallel=2), 2)
