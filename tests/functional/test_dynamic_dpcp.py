"""Dynamic DP/CP (the model JSON's use_dynamic_dpcp) through pretrain_t2v.py on 2 and 4 CPU processes: on
the quickstart's mixed data (64x64 and 48x96 clips of 9 frames: 110592 and 124416 video elements a
sample), max_seq_size between them makes iterations of both CP degrees; the losses and gradient norms equal
one process's on the same samples (DP N x micro-batch 1 reads what one process reads with micro-batch N),
and each iteration's layout is logged."""

from __future__ import annotations

import re

import pytest

from tests.functional.test_pretrain_t2v import _train, _variant

SMALL, LARGE = 3 * 9 * 64 * 64, 3 * 9 * 48 * 96  # video elements of a micro-batch of one clip


def _compare(assets, nproc, name, max_cp_size, max_seq_size, layouts, *flags):
    variant = _variant(assets, name, {"use_dynamic_dpcp": True, "max_cp_size": max_cp_size,
                                      "max_seq_size": max_seq_size})
    _, ref = _train(assets, 1, iters=4, gbs=4, mbs=nproc)
    _, out = _train(assets, nproc, *flags, iters=4, variant=variant, gbs=4, mbs=1)
    chosen = re.findall(r"iteration (\d+): dynamic DP/CP: (cp=\d \(dp=\d\))", out)
    assert [i for i, _ in chosen] == ["1", "2", "3", "4"], out[-3000:]
    assert {layout for _, layout in chosen} == layouts, chosen
    figures = [re.findall(r"(loss|grad norm): ([0-9.e+-]+) \|", text) for text in (ref, out)]
    assert len(figures[0]) == len(figures[1]) == 8, out[-3000:]
    for (_, a), (_, b) in zip(*figures):
        assert abs(float(a) - float(b)) <= 2e-5 * abs(float(a)), figures


@pytest.mark.slow
def test_dynamic_dpcp_on_2_processes_equals_one_process(assets):
    # 64x64 batches data-parallel, any 48x96 one spreads every sample over both ranks
    _compare(assets, 2, "dyn2", 2, SMALL, {"cp=1 (dp=2)", "cp=2 (dp=1)"})


@pytest.mark.slow
def test_dynamic_dpcp_on_4_processes_from_static_cp2_equals_one_process(assets):
    # the static layout CP2 x DP2; 64x64 batches at CP 2 (two CP groups), any 48x96 one at CP 4
    _compare(assets, 4, "dyn4", 4, SMALL // 2, {"cp=2 (dp=2)", "cp=4 (dp=1)"}, "--context-parallel-size", "2")
