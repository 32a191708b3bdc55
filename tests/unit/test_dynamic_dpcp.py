"""Dynamic DP/CP (MindSpeed-MM's use_dynamic_dpcp, max_cp_size, max_seq_size): the layouts, the CP degree
chosen from the largest micro-batch video, the sample-to-rank assignment and the configuration checks.
The training runs (2 and 4 processes, losses equal to the static layout's) are
tests/functional/test_dynamic_dpcp.py."""

from __future__ import annotations

import json

import pytest

from mm.parallel import ParallelSizes
from mm.parallel.dynamic_cp import assignment, choose_cp, cp_degrees, strategy_groups
from tests.unit.test_arguments import BASE_MODEL, _load, _problems


def test_cp_degrees_are_powers_of_two_up_to_max_cp_size_and_the_ranks():
    assert cp_degrees(8, 4) == [1, 2, 4]
    assert cp_degrees(2, 8) == [1, 2]
    assert cp_degrees(4, 1) == [1]


def test_the_smallest_cp_degree_that_fits_max_seq_size():
    degrees = [1, 2, 4]
    assert choose_cp(100, degrees, 100) == 1
    assert choose_cp(101, degrees, 100) == 2
    assert choose_cp(400, degrees, 100) == 4
    assert choose_cp(401, degrees, 100) == 4  # none fits: the largest (MindSpeed-MM keeps full DP)


def test_layouts_keep_cp_ranks_consecutive():
    sizes = ParallelSizes(world_size=8, context_parallel=2)
    assert strategy_groups(sizes, 1)["cp"] == [[r] for r in range(8)]
    assert strategy_groups(sizes, 4) == {"cp": [[0, 1, 2, 3], [4, 5, 6, 7]],
                                         "dp": [[0, 4], [1, 5], [2, 6], [3, 7]]}


@pytest.mark.parametrize("dpcp, cp, micro", [(2, 1, 2), (2, 2, 2), (4, 2, 1), (4, 4, 3), (8, 4, 2)])
def test_assignment_runs_every_sample_once_per_cp_group(dpcp, cp, micro):
    runs = assignment(dpcp, cp, micro)
    for first in range(0, dpcp, cp):
        group = runs[first:first + cp]
        assert all(r == group[0] for r in group)  # the members run the same micro-batches, in the same order
        assert sorted(group[0]) == [(o, m) for o in range(first, first + cp) for m in range(micro)]
    assert len({s for r in runs for s in r}) == dpcp * micro  # every sample of the global batch, in one group


def test_assignment_is_member_by_member():
    assert assignment(4, 2, 2) == [[(0, 0), (0, 1), (1, 0), (1, 1)]] * 2 + [[(2, 0), (2, 1), (3, 0), (3, 1)]] * 2
    assert assignment(2, 1, 2) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]


def _dynamic(**keys):
    model = json.loads(json.dumps(BASE_MODEL))
    model.update(use_dynamic_dpcp=True, max_cp_size=4, max_seq_size=1 << 20)
    model.update(keys)
    return {k: v for k, v in model.items() if v is not None}


def test_dynamic_dpcp_configuration_is_typed(tmp_path):
    cfg = _load(tmp_path, model=_dynamic(), world=8, flags=["--context-parallel-size", "2"])
    assert (cfg.model.use_dynamic_dpcp, cfg.model.max_cp_size, cfg.model.max_seq_size) == (True, 4, 1 << 20)


@pytest.mark.parametrize("keys, flags, world, message", [
    ({"max_cp_size": None}, [], 8, "use_dynamic_dpcp = true needs max_cp_size"),
    ({"max_cp_size": 3}, [], 8, "max_cp_size = 3; valid: a power of 2"),
    ({"max_seq_size": 0}, [], 8, "max_seq_size = 0; valid: an integer >= 1"),
    ({"max_cp_size": 8}, [], 4, "max_cp_size = 8 does not divide the 4 data-parallel x context-parallel ranks"),
    ({"max_cp_size": 8}, [], 8, "predictor.num_heads = 12 is not divisible by TP (1) x max_cp_size = 8"),
    ({}, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"], 8,
     "use_dynamic_dpcp = true with --context-parallel-algo megatron_cp_algo"),
    ({}, ["--pipeline-model-parallel-size", "2"], 8, "use_dynamic_dpcp = true with --pipeline-model-parallel-size 2"),
    ({}, ["--tensor-model-parallel-size", "2"], 8, "use_dynamic_dpcp = true with --tensor-model-parallel-size 2"),
    ({"enable_encoder_dp": True}, [], 8, "use_dynamic_dpcp = true with enable_encoder_dp = true"),
    ({}, ["--context-parallel-size", "2", "--global-batch-size", "4"], 8,
     "--global-batch-size 4 is not divisible by --micro-batch-size (1) x 8"),
])
def test_bad_dynamic_dpcp_settings_are_refused_before_start(tmp_path, keys, flags, world, message):
    assert message in _problems(tmp_path, model=_dynamic(**keys), flags=flags, world=world)
