"""text_encoder_fsdp (model JSON): the text encoders' parameters sharded over the ranks of pipeline
stage 0 during training. On the tiny Step-Video release (two text encoders: Step-LLM and HunyuanCLIP),
torchrun on 2 CPU processes with gloo: the DP2, TP2 and TP2 + encoder-DP losses equal one process's without
sharding (same seed), and rank 0's line reports each encoder's bytes, whole and per rank (about half of it here)."""

from __future__ import annotations

import re

import pytest

from tests.functional.test_stepvideo import _assert_same_losses, _layout, _model_json, _reference, _train
from tests.functional.test_stepvideo import assets  # noqa: F401 -- the module's fixture

CASES = {  # name -> (flags, micro-batch size, model JSON top-level changes); the one-process reference reads
    # micro-batches of micro-batch size x DP
    "dp2": ([], 1, {}),
    "tp2": (["--tensor-model-parallel-size", "2"], 1, {}),
    # encoder-DP: each TP rank encodes one of the micro-batch's 2 samples, one encoder call each
    "tp2_encoder_dp": (["--tensor-model-parallel-size", "2"], 2, {"enable_encoder_dp": True}),
}
SHARD_LINE = re.compile(r"pretrain_t2v\.py: text_encoder_fsdp: text encoders' parameters sharded over the 2 ranks "
                        r"of pipeline stage 0: (.*)")
ENCODER = re.compile(r"(\w+) (\d+) -> (\d+) bytes")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_text_encoders_keep_the_losses(assets, case):  # noqa: F811 -- the fixture
    flags, mbs, top = CASES[case]
    model_json = _model_json(assets, f"te_fsdp_{case}", text_encoder_fsdp=True, **top)
    got, out = _train(assets, 2, model_json, *flags, mbs=mbs)
    assert _layout(flags, 2) in out, out[-3000:]
    lines = SHARD_LINE.findall(out)
    assert len(lines) == 1, out[-3000:]  # rank 0 only, once
    encoders = ENCODER.findall(lines[0])
    assert [name for name, _, _ in encoders] == ["StepLLMEncoder", "HunyuanCLIPEncoder"], lines
    for name, whole, held in encoders:
        # each rank holds about half (FSDP pads each parameter's shards to equal rows)
        assert int(whole) / 2 <= int(held) < 0.6 * int(whole), (name, whole, held)
    dp = int(_layout(flags, 2).rsplit("DP=", 1)[1])
    _assert_same_losses(_reference(assets, mbs=mbs * dp), got, case)
