"""Release torch files (``mm.models.release_file``): wrapped state dicts unwrapped, everything else
named; the DiT's .pth (Phantom's) read through it."""

from __future__ import annotations

import pytest
import torch

from mm.models.predictor.name_table import read_weights
from mm.models.release_file import UnreadableFile, read_state_dict


def test_wrapped_and_prefixed_state_dicts_are_unwrapped(tmp_path):
    state = {"blocks.0.ffn.0.weight": torch.randn(4, 2), "head.head.bias": torch.randn(3)}
    for name, saved in (("flat", state), ("wrapped", {"state_dict": state, "epoch": 3}),
                        ("model", {"model": state}), ("ddp", {f"module.{k}": v for k, v in state.items()}),
                        ("both", {"module": {f"module.{k}": v for k, v in state.items()}})):
        torch.save(saved, tmp_path / f"{name}.pth")
        for got in (read_state_dict(tmp_path / f"{name}.pth", "predictor.from_pretrained"),
                    read_weights(str(tmp_path / f"{name}.pth"))):
            assert got.keys() == state.keys(), name
            for k in state:
                torch.testing.assert_close(got[k], state[k], rtol=0, atol=0)


def test_what_is_not_a_state_dict_is_named(tmp_path):
    key = "predictor.from_pretrained"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "model": {"b": torch.zeros(1)}}, tmp_path / "two.pth")
    with pytest.raises(ValueError, match=r"two.pth' is not a state dict \({name: tensor}\): entries that are not "
                                         "tensors: model, state_dict"):
        read_state_dict(tmp_path / "two.pth", key)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth' holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pth", key)
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="empty.pth' is not a state dict .*: it is empty"):
        read_state_dict(tmp_path / "empty.pth", key)
    data = (tmp_path / "list.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFile, match=f"{key} = '{tmp_path / 'cut.pth'}' is not a readable torch file"):
        read_state_dict(tmp_path / "cut.pth", key)
    with pytest.raises(FileNotFoundError, match="absent.pth': no such file"):
        read_state_dict(tmp_path / "absent.pth", key)
