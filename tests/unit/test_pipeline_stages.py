"""Pipeline stage layouts and the message that passes between DiT stages."""

from __future__ import annotations

import pytest
import torch

from mm.arguments.pipeline_layout import pipeline_layers_problems, pipeline_rows
from mm.models.predictor.pipeline import (
    StageMessage,
    from_rows,
    layer_layout,
    stage_span,
    to_rows,
)


def test_layer_layout_even_and_given():
    assert layer_layout(8, 4) == [[2, 2, 2, 2]]
    assert layer_layout(8, 2, 2) == [[2, 2], [2, 2]]
    assert layer_layout(6, 2, None, [1, 5]) == [[1, 5]]
    assert layer_layout(6, 2, 2, [[1, 2], [2, 1]]) == [[1, 2], [2, 1]]
    with pytest.raises(ValueError, match="pipeline_num_layers"):
        layer_layout(6, 2, None, [1, 4])
    with pytest.raises(ValueError, match="pipeline_num_layers"):
        layer_layout(7, 2)


def test_pipeline_layers_are_read_and_checked_in_one_place():
    """The model JSON's predictor.pipeline_num_layers and mm-convert's pp_layers alike."""
    assert pipeline_rows([1, 3]) == [[1, 3]] and pipeline_rows(((1, 1), (2, 0))) == [[1, 1], [2, 0]]
    for bad in ([], [1, [2]], [[1, 1], [2]], [[]], [1, -1], [1, True], "8,8", None):
        with pytest.raises(ValueError, match="expected a non-empty list of layer counts"):
            pipeline_rows(bad)
    with pytest.raises(ValueError, match=r"\(>= 1\)"):
        pipeline_rows([4, 0], least=1)
    assert pipeline_layers_problems([[1, 1], [1, 1]], 4, 2, 2) == []
    assert pipeline_layers_problems([2, 2], None, 2, None) == []
    assert "sums to 4 layers but predictor.num_layers = 6" in pipeline_layers_problems([2, 2], 6, 2, None)[0]
    assert "has 2 stage(s) but --pipeline-model-parallel-size is 4" in pipeline_layers_problems([2, 2], 4, 4, None)[0]
    assert "is 1-D but --virtual-pipeline-model-parallel-size is 2" in pipeline_layers_problems([2, 2], 4, 2, 2)[0]
    assert "a 2-D layout needs 1 row(s)" in pipeline_layers_problems([[1, 1], [1, 1]], 4, 2, None)[0]


def test_stage_span_follows_megatron_interleaving():
    layout = [[1, 2], [3, 4]]  # chunk 0: stage 0 then stage 1; chunk 1: stage 0 then stage 1
    spans = {(stage, chunk): stage_span(layout, stage, chunk) for stage in range(2) for chunk in range(2)}
    assert spans == {(0, 0): (0, 1), (1, 0): (1, 2), (0, 1): (3, 3), (1, 1): (6, 4)}
    covered = sorted(i for off, n in spans.values() for i in range(off, off + n))
    assert covered == list(range(10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_message_round_trip_exact_integers(dtype):
    msg = StageMessage(("x", "ctx", "img"), ("f", "big"))
    x, ctx = torch.randn(5, 2, 8), torch.randn(3, 2, 8)
    packed = msg.pack({"x": x, "ctx": ctx, "img": None}, {"f": 21, "big": 123_456_789}, dtype)
    assert packed.dtype == dtype and packed.shape[1:] == (2, 8)
    tensors, ints = msg.unpack(packed)
    assert ints == {"f": 21, "big": 123_456_789}  # bf16 holds base-256 digits exactly
    assert tensors["img"] is None
    torch.testing.assert_close(tensors["x"], x.to(dtype))
    torch.testing.assert_close(tensors["ctx"], ctx.to(dtype))


def test_message_gradients_reach_packed_tensors():
    msg = StageMessage(("a", "b"), ("n",))
    a, b = torch.randn(4, 1, 6, requires_grad=True), torch.randn(2, 1, 6, requires_grad=True)
    packed = msg.pack({"a": a, "b": b}, {"n": 7}, torch.float32)
    received = packed.detach().requires_grad_()
    tensors, _ = msg.unpack(received)
    (tensors["a"].sum() * 2 + tensors["b"].sum() * 3).backward()
    packed.backward(received.grad)
    torch.testing.assert_close(a.grad, torch.full_like(a, 2.0))
    torch.testing.assert_close(b.grad, torch.full_like(b, 3.0))


def test_rows_round_trip():
    t = torch.randn(2, 4, 3, 5, 7)
    rows = to_rows(t, 16)
    assert rows.shape == (27, 2, 16)  # 420 values per sample, padded to 432
    torch.testing.assert_close(from_rows(rows, t.shape[1:]), t)


def test_message_rejects_wrong_width():
    msg = StageMessage(("a", "b"))
    with pytest.raises(ValueError, match="'b'"):
        msg.pack({"a": torch.zeros(1, 1, 4), "b": torch.zeros(1, 1, 5)}, {}, torch.float32)


def test_message_spec_round_trips_every_kind_of_field():
    from mm.models.predictor.pipeline import Hidden, Ints, MessageSpec, PerSample

    spec = MessageSpec({"x": Hidden(), "mod": Hidden((6,)), "img": Hidden(), "mask": PerSample(1),
                        "carry": PerSample(4), "grid": Ints(3)})
    values = {"x": torch.randn(5, 2, 8), "mod": torch.randn(3, 2, 6, 8), "img": None, "mask": torch.randn(2, 11),
              "carry": torch.randn(2, 3, 4, 5, 6), "grid": (3, 4, 5), "ignored": "not in the spec"}
    out = spec.unpack(spec.pack(values, 8, torch.float64))
    assert set(out) == set(spec.fields) and out["img"] is None and out["grid"] == (3, 4, 5)
    for name in ("x", "mod", "mask", "carry"):
        torch.testing.assert_close(out[name], values[name].double(), msg=name)


def test_message_spec_names_a_field_of_the_wrong_shape():
    from mm.models.predictor.pipeline import Hidden, MessageSpec, PerSample

    with pytest.raises(ValueError, match=r"'mod' has shape \(3, 2, 5, 8\); expected \[n, b, 6, 8\]"):
        MessageSpec({"mod": Hidden((6,))}).pack({"mod": torch.zeros(3, 2, 5, 8)}, 8, torch.float32)
    with pytest.raises(ValueError, match="'carry' has shape .*: at most 4 dims after the batch"):
        MessageSpec({"carry": PerSample(4)}).pack({"carry": torch.zeros(1, 1, 1, 1, 1, 1)}, 8, torch.float32)
