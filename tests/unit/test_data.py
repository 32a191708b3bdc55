"""The video data pipeline on real .mp4 files the tests write (H.264 through PyAV)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from mm.data import (BadSample, BucketSampler, SkipCounter, VideoDataConfig, VideoDataset, collate, frame_indices,
                     make_dataset, probe, read_data_txt, read_frames)

decord = pytest.importorskip("decord")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, num_videos=8, frames=17, sizes=[(64, 64), (48, 96)], fps=16, seed=0)
    return root


def test_decord_and_pyav_give_the_same_frames(dataset_dir):
    path = dataset_dir / "videos/clip_0001.mp4"
    assert probe(path, "decord").num_frames == probe(path, "pyav").num_frames == 17
    indices = [0, 3, 8, 16]
    a = read_frames(path, indices, "decord").astype(np.int16)
    b = read_frames(path, indices, "pyav").astype(np.int16)
    assert a.shape == b.shape == (4, 48, 96, 3)
    assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 3


def test_frame_sampling_follows_the_target_fps():
    rng = random.Random(0)
    assert frame_indices(100, 30.0, 5, 15.0, "skip", rng)[1:] == [i + 2 for i in frame_indices(
        100, 30.0, 5, 15.0, "skip", random.Random(0))[:-1]]  # stride 2: 30 fps sampled at 15
    idx = frame_indices(100, 16.0, 9, 16.0, "skip", rng)
    assert np.diff(idx).tolist() == [1] * 8
    assert frame_indices(10, 16.0, 9, 4.0, "pad", rng) == [0, 4, 8, 9, 9, 9, 9, 9, 9]
    with pytest.raises(BadSample, match="too short"):
        frame_indices(10, 16.0, 9, 4.0, "skip", rng)


def test_dataset_items_and_buckets(dataset_dir):
    samples, dropped = read_data_txt(dataset_dir / "data.txt")
    assert len(samples) == 8 and not dropped
    cfg = VideoDataConfig.from_json({"buckets": [[9, 32, 32], [9, 32, 64], [5, 64, 32]], "train_fps": 8})
    ds = VideoDataset(samples, cfg)
    for i, sample in enumerate(samples):
        frames, h, w = cfg.buckets[ds.bucket_of[i]]
        assert (h / w) == pytest.approx(sample.height / sample.width)  # the bucket of its aspect ratio
    item = ds[1]
    assert item["video"].shape == (3, 9, 32, 64) and item["skipped"] == []
    assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0
    assert "moving" in item["caption"]


def test_dp_ranks_never_share_samples_and_resume_is_exact():
    bucket_of = [i % 3 for i in range(60)]
    ranks = [BucketSampler(bucket_of, micro_batch_size=2, data_parallel_rank=r, data_parallel_size=2, seed=7)
             for r in range(2)]
    per_epoch = len(ranks[0].epoch_batches(0))
    seen = [[i for _, b in zip(range(per_epoch), iter(s)) for i in b] for s in ranks]
    assert not set(seen[0]) & set(seen[1])
    for batch_ids in (seen[0][i:i + 2] for i in range(0, len(seen[0]), 2)):
        assert len({bucket_of[i] for i in batch_ids}) == 1  # one bucket per micro-batch
    full = BucketSampler(bucket_of, 2, 1, 2, seed=7)
    it = iter(full)
    expected = [next(it) for _ in range(per_epoch + 5)]  # crosses an epoch boundary
    resumed = iter(BucketSampler(bucket_of, 2, 1, 2, consumed_samples=7 * 4, seed=7))
    assert [next(resumed) for _ in range(per_epoch + 5 - 7)] == expected[7:]


def test_bad_files_are_skipped_and_counted(dataset_dir, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(dataset_dir, root)
    records = json.loads((dataset_dir / "annotation.json").read_text())
    (root / "videos/corrupt.mp4").write_bytes(bytes(random.Random(0).randbytes(5000)))
    good = (dataset_dir / "videos/clip_0000.mp4").read_bytes()
    (root / "videos/truncated.mp4").write_bytes(good[: len(good) // 3])
    import av

    container = av.open(str(root / "videos/zero.mp4"), "w")  # a header and no frames
    stream = container.add_stream("libx264", rate=16)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    (root / "videos/vanishing.mp4").write_bytes(good)
    bad = [dict(records[0], path=f"videos/{n}.mp4") for n in ("corrupt", "truncated", "zero", "vanishing")]
    for rec in bad:
        rec["resolution"] = {"height": 64, "width": 64}
    (root / "annotation.json").write_text(json.dumps(records + bad))
    (root / "data.txt").write_text(f"{root},{root / 'annotation.json'}\n")
    samples, dropped = read_data_txt(root / "data.txt")
    (root / "videos/vanishing.mp4").unlink()  # gone after start-up
    ds = VideoDataset(samples, VideoDataConfig.from_json({"num_frames": 9, "max_height": 32, "max_width": 32,
                                                           "max_substitutes": 20}))
    counter = SkipCounter()
    n = len(samples)
    for start in range(0, n - n % 4, 4):
        batch = collate([ds[i] for i in range(start, start + 4)])
        assert batch["video"].shape[0] == 4  # the batch never shrinks
        counter.update(batch)
    bad_index = {s.path.split("/")[-1]: i for i, s in enumerate(samples) if i >= 8}
    reasons = {name: ds[i]["skipped"][0][1] for name, i in bad_index.items()}
    assert reasons["corrupt.mp4"] == "unreadable"
    assert reasons["truncated.mp4"] in ("unreadable", "too short")
    assert reasons["zero.mp4"] in ("no frames", "unreadable", "empty file")
    assert reasons["vanishing.mp4"] == "missing"
    assert sum(counter.counts.values()) >= 4 and "skipped" in counter.summary()


def test_missing_entries_are_counted_at_start_and_empty_is_an_error(tmp_path):
    (tmp_path / "annotation.json").write_text(json.dumps([{"path": "gone.mp4", "cap": "x"}]))
    (tmp_path / "data.txt").write_text(f"{tmp_path},{tmp_path / 'annotation.json'}\n")
    with pytest.raises(ValueError, match=r"no usable samples \(\{'missing at start-up': 1\}\)"):
        read_data_txt(tmp_path / "data.txt")
    with pytest.raises(FileNotFoundError, match="data_path = .*: no such file"):
        read_data_txt(tmp_path / "absent.txt")


def test_a_bad_annotation_or_root_names_the_data_txt_line_and_the_file(tmp_path):
    (tmp_path / "annotation.json").write_text('[{"path": "a.mp4", "cap": "x"},\n {"path": "b.mp4" "cap": "y"}]')
    (tmp_path / "data.txt").write_text(f"# comment\n{tmp_path},{tmp_path / 'annotation.json'}\n")
    with pytest.raises(ValueError, match=r"data\.txt:2: annotation file '.*annotation\.json': not valid JSON "
                                         r"\(Expecting ',' delimiter at line 2, column 19\)"):
        read_data_txt(tmp_path / "data.txt")
    (tmp_path / "annotation.json").write_text('["a.mp4"]')
    with pytest.raises(ValueError, match=r"record 0: expected a JSON object with 'path' and 'cap', got 'a.mp4'"):
        read_data_txt(tmp_path / "data.txt")
    (tmp_path / "data.txt").write_text(f"{tmp_path / 'videos'},{tmp_path / 'annotation.json'}\n")
    with pytest.raises(FileNotFoundError, match=r"data\.txt:1: dataset root '.*videos' is not a directory"):
        read_data_txt(tmp_path / "data.txt")


def test_metadata_csv_source(dataset_dir, tmp_path):
    (tmp_path / "metadata.csv").write_text("video,prompt\nvideos/clip_0000.mp4,a clip\n")
    (tmp_path / "data.txt").write_text(f"{dataset_dir},{tmp_path / 'metadata.csv'}\n")
    samples, _ = read_data_txt(tmp_path / "data.txt")
    assert [s.caption for s in samples] == ["a clip"]
    assert torch.is_tensor(VideoDataset(samples, VideoDataConfig.from_json({"num_frames": 5, "max_height": 16,
                                                                             "max_width": 16}))[0]["video"])


def test_dataloader_from_the_data_json(dataset_dir, tmp_path):
    from mm.arguments import load_config
    from mm.data.loader import build_video_dataloader
    from tests.encoder_helpers import save_tokenizer

    save_tokenizer(tmp_path / "tok")
    data_json = {"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": str(dataset_dir / "data.txt")},
                                   "preprocess_parameters": {"buckets": [[5, 32, 32], [5, 32, 64]], "train_fps": 16},
                                   "tokenizer_config": {"from_pretrained": str(tmp_path / "tok"), "model_max_length": 16}},
                 "dataloader_param": {"shuffle": True}}
    (tmp_path / "data.json").write_text(json.dumps(data_json))
    (tmp_path / "model.json").write_text(json.dumps({"predictor": {"model_id": "wan_dit"}}))
    cfg = load_config(["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
                       "--train-iters", "1", "--lr", "1"], world_size=1)
    loader, _ = build_video_dataloader(cfg.data, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1,
                                       num_workers=1)
    batch = next(iter(loader))
    assert batch["video"].shape[0] == 2 and batch["video"].shape[2] == 5
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].sum() > 0


def test_images_are_one_frame_samples_and_i2v_carries_condition_frames(dataset_dir, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 80, 3), 200, dtype=np.uint8)).save(tmp_path / "still.png")
    records = json.loads((dataset_dir / "annotation.json").read_text())[:2]
    records = [dict(r, path=str(dataset_dir / r["path"])) for r in records]
    records.append({"path": str(tmp_path / "still.png"), "cap": "a grey picture",
                    "resolution": {"height": 40, "width": 80}})
    (tmp_path / "annotation.json").write_text(json.dumps(records))
    (tmp_path / "data.txt").write_text(f"/,{tmp_path / 'annotation.json'}\n")
    samples, _ = read_data_txt(tmp_path / "data.txt")
    cfg = VideoDataConfig.from_json({"buckets": [[9, 32, 32], [9, 32, 64], [1, 32, 64]]}, dataset_type="flf2v")
    ds = VideoDataset(samples, cfg)
    image = ds[2]
    assert image["video"].shape == (3, 1, 32, 64) and image["caption"] == "a grey picture"
    clip = ds[0]
    assert clip["condition_frames"].shape == (3, 2, 32, 32)
    torch.testing.assert_close(clip["condition_frames"][:, 1], clip["video"][:, -1])
    without = VideoDataset(samples, VideoDataConfig.from_json({"buckets": [[9, 32, 32]]}))
    assert len(without) == 2 and without.dropped["image without a 1-frame bucket"] == 1


def test_a_clip_decord_cannot_decode_is_read_with_pyav(tmp_path):
    """decord 0.6 fails on 48-pixel-wide frames; such a clip is not a bad sample."""
    import importlib.util

    import numpy as np

    from mm.data.decoding import read_frames
    from mm.data.synthetic import render_clip
    from mm.data.video_writer import write_mp4

    if importlib.util.find_spec("decord") is None:
        pytest.skip("decord is not installed")
    path = tmp_path / "narrow.mp4"
    write_mp4(path, render_clip(9, 96, 48, "square", "red", "white", "left to right"), 16)
    via_decord = read_frames(path, [0, 4, 8], "decord")
    assert via_decord.shape == (3, 96, 48, 3)
    assert np.array_equal(via_decord, read_frames(path, [0, 4, 8], "pyav"))
