"""Encoder interleaved offload: the same encodings as without it, N steps at a time."""

from __future__ import annotations

import pytest
import torch

from mm.models.encoder_offload import InterleavedEncoderOffload


def test_offload_interval_4_gives_the_same_encodings():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 3)
    batches = [torch.randn(2, 5) for _ in range(10)]
    direct = [encoder(b).detach() for b in batches]
    calls = []

    def encode(batch):
        calls.append(len(calls))
        return encoder(batch)

    offload = InterleavedEncoderOffload([encoder], interval=4, device=torch.device("cpu"))
    groups = []
    encoded = []
    for out in offload.iterate(batches, encode):
        groups.append(len(calls))  # how many batches had been encoded when this one came out
        encoded.append(out)
    assert groups == [4, 4, 4, 4, 8, 8, 8, 8, 10, 10]
    for a, b in zip(encoded, direct):
        torch.testing.assert_close(a, b)
        assert not a.requires_grad


def test_offload_interval_must_be_positive():
    with pytest.raises(ValueError, match="encoder_offload_interval = 0; valid: an integer >= 1"):
        InterleavedEncoderOffload([], interval=0, device=torch.device("cpu"))
