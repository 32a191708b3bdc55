"""Writing a sample: a failed video write names its path and leaves no partial file; the latents of
a sample that could not be written are kept beside the intended video, else in a fallback directory
under the system's temporary directory."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from mm.data.video_writer import write_mp4
from mm.inference.runner import KEPT_SUFFIX, LatentKeeper

VIDEO = np.zeros((3, 16, 16, 3), dtype=np.uint8)


def test_a_failed_video_write_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "a_seed1.mp4"
    with pytest.raises(NotADirectoryError) as raised:
        write_mp4(target, VIDEO, 8)
    assert raised.value.filename == str(target) and str(target) in str(raised.value)
    write_mp4(tmp_path / "ok.mp4", VIDEO, 8)
    assert (tmp_path / "ok.mp4").stat().st_size > 0


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The system's temporary directory, for LatentKeeper's fallback, moved under tmp_path."""
    root = tmp_path / "system_tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_latents_are_kept_beside_the_video_else_in_the_fallback(tmp_path, temp_root):
    latents = torch.randn(1, 4, 3, 8, 8)
    keeper = LatentKeeper()
    # the directory takes files: beside the intended video, a free name
    (tmp_path / f"a_seed1{KEPT_SUFFIX}").write_text("an earlier one")
    kept, refused = keeper.keep(latents, "a", 1, tmp_path / "a_seed1.mp4")
    assert kept == tmp_path / f"a_seed1_1{KEPT_SUFFIX}" and refused == []
    record = torch.load(kept)
    assert torch.equal(record["latents"], latents)
    assert (record["prompt"], record["seed"], record["video"]) == ("a", 1, str(tmp_path / "a_seed1.mp4"))
    # the directory is gone (a file in its place): the run's fallback directory under the temp root,
    # the same one for every later sample
    blocker = tmp_path / "samples"
    blocker.write_text("")
    kept, refused = keeper.keep(latents, "b", 2, blocker / "b_seed2.mp4")
    assert kept.parent.parent == temp_root and kept.parent.name.startswith("mm_unwritten_")
    assert kept.name == f"b_seed2{KEPT_SUFFIX}" and torch.equal(torch.load(kept)["latents"], latents)
    assert refused == [f"{blocker / f'b_seed2{KEPT_SUFFIX}'}: [Errno 20] Not a directory"]
    again, _ = keeper.keep(latents, "c", 3, blocker / "c_seed3.mp4")
    assert again.parent == kept.parent


def test_nowhere_to_keep_the_latents_is_reported(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))  # the fallback cannot be made either
    kept, refused = LatentKeeper().keep(torch.zeros(1), "a", 1, blocker / "a_seed1.mp4")
    assert kept is None and len(refused) == 2
    assert refused[0] == f"{blocker / f'a_seed1{KEPT_SUFFIX}'}: [Errno 20] Not a directory"
    assert refused[1].startswith(f"{blocker}/mm_unwritten_") and refused[1].endswith(": [Errno 20] Not a directory")
    assert list(tmp_path.iterdir()) == [blocker]
