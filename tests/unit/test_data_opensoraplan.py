"""OpenSoraPlan 1.3 data geometry in the video dataset, on real .mp4 files the tests write: every
sample's own (frames, height, width) from its annotation, batches of one shape, drops counted by
reason, static size, caption dropout (cfg), and MindSpeed-MM's data-JSON keys checked loudly.

The expected shapes come from the rule as the OpenSoraPlan reference states it, written out again
here (``expected_size``, ``expected_frames``), not from mm's code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mm.data import BucketSampler, Sample, VideoDataConfig, VideoDataset, collate, make_dataset, read_data_txt

decord = pytest.importorskip("decord")

KEY = "dataset_param.preprocess_parameters"
REPO = Path(__file__).resolve().parents[2]

# preprocess_parameters of MindSpeed-MM's examples/opensoraplan1.3/t2v/data_dynamic_resolution.json
DYNAMIC_JSON = {
    "video_processor_type": "OpensoraplanVideoProcessor", "video_reader_type": "DecordVideo",
    "image_reader_type": "Image", "num_frames": 93, "min_num_frames": 29, "frame_interval": 1, "max_hxw": 225280,
    "train_fps": 16, "speed_factor": 1.0, "drop_short_ratio": 0.0, "vae_scale_factor": [4, 8, 8], "cfg": 0.1,
    "hw_stride": 32, "force_resolution": False, "seed": 42, "hw_aspect_thr": 2.0, "use_aesthetic": True,
    "train_pipeline": {"video": [
        {"trans_type": "ToTensorVideo"},
        {"trans_type": "MaxHWResizeVideo",
         "param": {"align_corners": True, "antialias": True, "transform_size": "auto"}},
        {"trans_type": "SpatialStrideCropVideo", "param": {"stride": 32}},
        {"trans_type": "ae_norm"}]},
}


def _static_steps(top_crop: bool) -> list[dict]:
    return [{"trans_type": "ToTensorVideo"},
            {"trans_type": "CenterCropResizeVideo", "param": {"use_short_edge": False, "top_crop": top_crop,
                                                             "align_corners": True, "antialias": True,
                                                             "transform_size": "auto"}},
            {"trans_type": "ae_norm"}]


# ... and of its data_static_resolution.json
STATIC_JSON = {
    "video_reader_type": "decoder", "image_reader_type": "Image", "num_frames": 93, "min_num_frames": 93,
    "frame_interval": 1, "max_height": 352, "max_width": 640, "train_fps": 16, "speed_factor": 1.0,
    "drop_short_ratio": 0.0, "cfg": 0.1, "hw_stride": 32, "vae_scale_factor": [4, 8, 8], "force_resolution": True,
    "seed": 42, "hw_aspect_thr": 2.0, "use_aesthetic": True,
    "train_pipeline": {"video": _static_steps(False), "image": _static_steps(True)},
}

# the same rules at the size of the test clips
TINY = {"num_frames": 13, "min_num_frames": 5, "vae_scale_factor": [4, 8, 8], "hw_stride": 16, "max_hxw": 2048,
        "min_hxw": 512, "train_fps": 16, "force_resolution": False, "hw_aspect_thr": 2.0}
GROUPS = [(17, 16), (24, 32), (10, 24)]  # (frames, fps) of each group of clips
SIZES = [(48, 64), (64, 64)]


def expected_size(height: int, width: int, max_hxw: int, stride: int) -> tuple[int, int]:
    if height * width > max_hxw:
        scale = (max_hxw / (height * width)) ** 0.5
        height, width = int(height * scale), int(width * scale)
    return height // stride * stride, width // stride * stride


def expected_frames(frames: int, fps: float, train_fps: float, most: int, least: int, stride_t: int) -> int | None:
    step = 1.0 if abs(fps - train_fps) < 0.1 else fps / train_fps
    resampled = math.ceil(frames / step)  # indices 0, step, 2 step, ... below frames
    for y in range(min(resampled, most), least - 1, -1):
        if (y - 1) % stride_t == 0:
            return y
    return None


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Annotation records (absolute paths) of 12 clips: 3 (frames, fps) groups x 2 sizes x 2."""
    root = tmp_path_factory.mktemp("osp")
    records = []
    for g, (frames, fps) in enumerate(GROUPS):
        make_dataset(root / f"g{g}", num_videos=4, frames=frames, sizes=SIZES, fps=fps, seed=g)
        for rec in json.loads((root / f"g{g}/annotation.json").read_text()):
            records.append(dict(rec, path=str(root / f"g{g}" / rec["path"])))
    return root, records


def _samples(root: Path, records: list[dict], name: str = "annotation") -> list[Sample]:
    (root / f"{name}.json").write_text(json.dumps(records))
    (root / f"{name}.txt").write_text(f"/,{root / f'{name}.json'}\n")
    samples, dropped = read_data_txt(root / f"{name}.txt")
    assert not dropped
    return samples


def _fake(n: int, **fields) -> list[Sample]:
    """Annotation-only samples: building the dataset reads no file."""
    base = {"num_frames": 17, "fps": 16.0, "height": 48, "width": 64, "aesthetic": None} | fields
    return [Sample(f"/absent/clip_{i}.mp4", f"caption {i}", **base) for i in range(n)]


def test_dynamic_shapes_follow_the_rule_and_items_have_them(clips, tmp_path):
    _, records = clips
    samples = _samples(tmp_path, records)
    ds = VideoDataset(samples, VideoDataConfig.from_json(dict(TINY)))
    assert len(ds) == 12 and not ds.dropped
    shapes = [ds.buckets[b] for b in ds.bucket_of]
    for sample, shape in zip(samples, shapes):
        frames = expected_frames(sample.num_frames, sample.fps, 16, 13, 5, 4)
        assert shape == (frames, *expected_size(sample.height, sample.width, 2048, 16))
    assert len({s[0] for s in shapes}) == 3 and len({s[1:] for s in shapes}) == 2  # dynamic frames and sizes
    for i in range(len(ds)):
        item = ds[i]
        assert item["skipped"] == [] and item["video"].shape == (3, *shapes[i])
        assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0


def test_every_batch_is_one_shape(clips, tmp_path):
    _, records = clips
    ds = VideoDataset(_samples(tmp_path, records), VideoDataConfig.from_json(dict(TINY)))
    sampler = BucketSampler(ds.bucket_of, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1, seed=3)
    batches = sampler.epoch_batches(0)
    assert len(batches) == 6  # 6 shapes of 2 samples
    for indices in batches:
        batch = collate([ds[i] for i in indices])
        assert batch["video"].shape == (2, 3, *ds.buckets[batch["bucket"]])


def test_samples_without_a_shape_are_dropped_and_counted():
    ok = _fake(3)
    bad = {
        "no resolution in annotation": _fake(1, height=None, width=None),
        "no num_frames in annotation": _fake(1, num_frames=None),
        "smaller than hw_stride": _fake(1, height=8, width=12),
        "below min_hxw": _fake(1, height=16, width=16),  # 256 < 512 pixels
        "aspect ratio outside hw_aspect_thr": _fake(2, height=16, width=96) + _fake(1, height=96, width=16),
        "fewer than min_num_frames": _fake(1, num_frames=4) + _fake(1, num_frames=8, fps=32.0),
    }
    samples = ok + [s for group in bad.values() for s in group]
    ds = VideoDataset(samples, VideoDataConfig.from_json(dict(TINY)))
    assert len(ds) == 3 and dict(ds.dropped) == {reason: len(group) for reason, group in bad.items()}
    with pytest.raises(ValueError, match="no usable samples.*below min_hxw"):
        VideoDataset(bad["below min_hxw"], VideoDataConfig.from_json(dict(TINY)))


def test_drop_short_ratio_and_minority_shapes():
    # 12 resampled frames < num_frames 13: short; 13 and 17: not short
    short, long = _fake(8, num_frames=12), _fake(2, num_frames=13) + _fake(2, num_frames=17)
    ds = VideoDataset(short + long, VideoDataConfig.from_json(dict(TINY, drop_short_ratio=1.0)))
    assert len(ds) == 4 and ds.dropped == {"shorter than num_frames (drop_short_ratio)": 8}
    half = [VideoDataset(short, VideoDataConfig.from_json(dict(TINY, drop_short_ratio=0.5))) for _ in range(2)]
    assert [s.path for s in half[0].samples] == [s.path for s in half[1].samples]  # deterministic
    assert 0 < len(half[0]) < 8
    assert not VideoDataset(short, VideoDataConfig.from_json(dict(TINY))).dropped  # 0.0: dynamic frames
    minority = _fake(3) + _fake(1, height=64, width=64)
    ds = VideoDataset(minority, VideoDataConfig.from_json(dict(TINY, min_bucket_samples=2)))
    assert len(ds) == 3 and ds.dropped == {"minority shape (min_bucket_samples)": 1}


def test_a_file_unlike_its_annotation_is_skipped_at_load(clips, tmp_path):
    _, records = clips
    square = next(r for r in records if r["resolution"] == {"height": 64, "width": 64} and r["num_frames"] == 17)
    wide = next(r for r in records if r["resolution"] == {"height": 48, "width": 64} and r["num_frames"] == 17)
    lying = [dict(square, resolution={"height": 48, "width": 64}),  # a 64x64 file said to be 48x64
             dict(wide, num_frames=1000, fps=16)]  # a 17-frame file said to hold 1000
    samples = _samples(tmp_path, [wide, wide] + lying)
    ds = VideoDataset(samples, VideoDataConfig.from_json(dict(TINY)))
    assert len(set(ds.bucket_of)) == 1  # all four look like 13x32x48 clips
    items = [ds[i] for i in range(4)]
    assert [i["skipped"][0][1] if i["skipped"] else None for i in items] == [
        None, None, "size differs from annotation", "too short"]
    assert items[2]["video"].shape == (3, 13, 32, 48) and items[2]["path"] == samples[0].path  # a substitute


def test_static_resolution(clips, tmp_path):
    _, records = clips
    samples = _samples(tmp_path, records + [dict(records[0], resolution={"height": 16, "width": 96})])
    params = {"num_frames": 13, "min_num_frames": 5, "max_height": 32, "max_width": 48, "force_resolution": True,
              "train_fps": 16, "hw_aspect_thr": 2.0, "train_pipeline": {"video": _static_steps(False)}}
    ds = VideoDataset(samples, VideoDataConfig.from_json(params))
    assert ds.dropped == {"aspect ratio outside hw_aspect_thr": 1}  # 16/96 < (32/48) / 2
    for i, sample in enumerate(ds.samples):
        frames = expected_frames(sample.num_frames, sample.fps, 16, 13, 5, 4)
        assert ds.buckets[ds.bucket_of[i]] == (frames, 32, 48)
        assert ds[i]["video"].shape == (3, frames, 32, 48)
    fixed = VideoDataset(samples, VideoDataConfig.from_json(dict(params, min_num_frames=13)))
    assert fixed.buckets == [(13, 32, 48)] and fixed.dropped["fewer than min_num_frames"] == 8


def test_static_crop_follows_top_crop(tmp_path):
    from PIL import Image

    rows = torch.linspace(0, 255, 96).round().to(torch.uint8)[:, None, None].expand(96, 32, 3)  # brighter down
    Image.fromarray(rows.contiguous().numpy()).save(tmp_path / "tall.png")
    samples = [Sample(str(tmp_path / "tall.png"), "a gradient", height=96, width=32)]
    means = {}
    for top in (True, False):
        params = {"num_frames": 5, "max_height": 32, "max_width": 32, "force_resolution": True, "hw_aspect_thr": 3.0,
                  "train_pipeline": {"video": _static_steps(False), "image": _static_steps(top)}}
        item = VideoDataset(samples, VideoDataConfig.from_json(params))[0]
        assert item["video"].shape == (3, 1, 32, 32)
        means[top] = item["video"].mean().item()
    # the top third of the gradient is darker than its middle third ([-1, 1] pixel means)
    assert means[True] == pytest.approx(-2 / 3, abs=0.05) and means[False] == pytest.approx(0.0, abs=0.05)


def test_cfg_drops_captions_at_its_rate_deterministically(clips, tmp_path):
    samples = _fake(40)
    ds = VideoDataset(samples, VideoDataConfig.from_json(dict(TINY, cfg=0.25)))

    def captions(dataset, epochs=range(100)):
        out = []
        for e in epochs:
            dataset.epoch = e
            out.append([dataset.caption(i) for i in range(len(dataset))])
        return out

    seen = captions(ds)
    empty = sum(c == "" for epoch in seen for c in epoch)
    assert abs(empty / 4000 - 0.25) < 0.03
    assert all(c in ("", s.caption) for epoch in seen for c, s in zip(epoch, samples))
    assert seen == captions(VideoDataset(samples, VideoDataConfig.from_json(dict(TINY, cfg=0.25))))
    assert seen != captions(VideoDataset(samples, VideoDataConfig.from_json(dict(TINY, cfg=0.25, seed=7))))
    assert seen[0] != seen[1]  # a new draw every epoch
    assert not any(c == "" for e in captions(VideoDataset(samples, VideoDataConfig.from_json(dict(TINY))), range(5))
                   for c in e)
    _, records = clips
    real = VideoDataset(_samples(tmp_path, records), VideoDataConfig.from_json(dict(TINY, cfg=0.5)))
    assert [real[i]["caption"] for i in range(4)] == [real.caption(i) for i in range(4)]  # the item's caption


def test_use_aesthetic_marks_low_and_high_scores():
    scores = [4.0, 5.0, 6.0, None]
    samples = [Sample(f"/absent/{i}.mp4", "a red square", 17, 16.0, 48, 64, a) for i, a in enumerate(scores)]
    marked = VideoDataset(samples, VideoDataConfig.from_json(dict(TINY, use_aesthetic=True)))
    low, mid, high, none = (marked.caption(i) for i in range(4))
    assert mid == none == "a red square"
    assert low.startswith("a red square ") and high.startswith("a red square ") and low != high
    plain = VideoDataset(samples, VideoDataConfig.from_json(dict(TINY)))
    assert {plain.caption(i) for i in range(4)} == {"a red square"}


def test_the_mindspeed_jsons_are_read():
    dyn = VideoDataConfig.from_json(dict(DYNAMIC_JSON))
    assert dyn.video_reader_type == "decord" and dyn.cfg == 0.1 and dyn.use_aesthetic and dyn.buckets == []
    samples = [Sample(f"/absent/{i}.mp4", "x", n, fps, h, w) for i, (n, fps, h, w) in enumerate(
        [(200, 30.0, 720, 1280), (61, 16.0, 1080, 1920), (120, 24.0, 480, 640), (50, 16.0, 1280, 720),
         (93, 16.0, 480, 480), (93, 16.0, 654, 1000),  # 383.8 x 586.9 after scaling: int() then floor matters
         (20, 16.0, 720, 1280), (93, 16.0, 200, 200), (93, 16.0, 300, 900)])]
    ds = VideoDataset(samples, dyn)
    assert ds.dropped == {"fewer than min_num_frames": 1, "below min_hxw": 1, "aspect ratio outside hw_aspect_thr": 1}
    for i, s in enumerate(ds.samples):
        size = expected_size(s.height, s.width, 225280, 32)
        assert ds.buckets[ds.bucket_of[i]] == (expected_frames(s.num_frames, s.fps, 16, 93, 29, 4), *size)
        assert size[0] * size[1] <= 225280
    fast = VideoDataConfig.from_json(dict(DYNAMIC_JSON, speed_factor=2.0)).per_sample.resampled(400, 16.0, 16.0)
    assert len(fast) == 200 and fast[0] == 0 and fast[-1] == 399  # every other frame, end to end
    static = VideoDataConfig.from_json(dict(STATIC_JSON))
    assert static.per_sample.force_size == (352, 640) and static.video_reader_type == "decord"
    assert static.per_sample.image.top_crop and not static.per_sample.video.top_crop
    assert VideoDataset(samples, static).buckets == [(93, 352, 640)]


def test_the_wan_jsons_keep_their_buckets():
    for path in sorted(REPO.glob("examples/wan2.*/**/data.json")):
        params = json.loads(path.read_text())["dataset_param"]["preprocess_parameters"]
        cfg = VideoDataConfig.from_json(params)
        assert cfg.per_sample is None and cfg.buckets == [tuple(b) for b in params["buckets"]], path


def _steps(*names, **params):
    return {"video": [{"trans_type": n, **({"param": params[n]} if n in params else {})} for n in names]}


BAD = [
    (dict(DYNAMIC_JSON, train_pipeline=_steps("ToTensorVideo", "RandomHorizontalFlipVideo", "ae_norm")),
     "train_pipeline.video[1].trans_type", "RandomHorizontalFlipVideo"),
    (dict(DYNAMIC_JSON, train_pipeline=_steps("ToTensorVideo", "SpatialStrideCropVideo", "MaxHWResizeVideo",
                                              "ae_norm")), "train_pipeline.video", "SpatialStrideCropVideo"),
    (dict(DYNAMIC_JSON, train_pipeline=_steps("ToTensorVideo", "MaxHWResizeVideo", "SpatialStrideCropVideo", "ae_norm",
                                              SpatialStrideCropVideo={"stride": 16})),
     "train_pipeline.video[2].param.stride", 16),
    (dict(DYNAMIC_JSON, train_pipeline=_steps("ToTensorVideo", "MaxHWResizeVideo", "SpatialStrideCropVideo", "ae_norm",
                                              MaxHWResizeVideo={"interpolation_mode": "bicubic"})),
     "train_pipeline.video[1].param.interpolation_mode", "bicubic"),
    (dict(STATIC_JSON, train_pipeline={"video": [dict(s, param=dict(s["param"], use_short_edge=True)) if "param" in s
                                                 else s for s in _static_steps(False)]}),
     "train_pipeline.video[1].param.use_short_edge", True),
    (dict(STATIC_JSON, train_pipeline={"video": _static_steps(False)[:1] + [{"trans_type": "CenterCropResizeVideo",
                                                                              "param": {"size": [480, 640]}}]
                                       + _static_steps(False)[2:]}),
     "train_pipeline.video[1].param.size", [480, 640]),
    (dict(DYNAMIC_JSON, video_processor_type="WanVideoProcessor"), "video_processor_type", "WanVideoProcessor"),
    (dict(DYNAMIC_JSON, video_reader_type="opencv"), "video_reader_type", "opencv"),
    (dict(DYNAMIC_JSON, image_reader_type="cv2"), "image_reader_type", "cv2"),
    (dict(DYNAMIC_JSON, frame_interval=2), "frame_interval", 2),
    (dict(DYNAMIC_JSON, speed_factor=0.5), "speed_factor", 0.5),
    (dict(DYNAMIC_JSON, drop_short_ratio=1.5), "drop_short_ratio", 1.5),
    (dict(DYNAMIC_JSON, vae_scale_factor=[4, 8]), "vae_scale_factor", [4, 8]),
    (dict(DYNAMIC_JSON, hw_stride=20, train_pipeline=None), "hw_stride", 20),
    (dict(DYNAMIC_JSON, cfg=1.5), "cfg", 1.5),
    (dict(DYNAMIC_JSON, force_resolution="no"), "force_resolution", "no"),
    (dict(DYNAMIC_JSON, max_height=352), "max_height", 352),
    (dict(STATIC_JSON, max_hxw=225280), "max_hxw", 225280),
    (dict(DYNAMIC_JSON, min_num_frames=100), "min_num_frames", 100),
    (dict(DYNAMIC_JSON, short_clip="pad"), "short_clip", "pad"),
    (dict(DYNAMIC_JSON, buckets=[[93, 352, 640]]), "buckets", [[93, 352, 640]]),
    ({"buckets": [[81, 480, 832]], "hw_stride": 32}, "hw_stride", 32),
    ({"num_frames": 81, "max_height": 480, "max_width": 832, "drop_short_ratio": 0.0}, "drop_short_ratio", 0.0),
]


@pytest.mark.parametrize("params,key,value", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_keys_name_the_key_the_value_and_what_is_valid(params, key, value):
    params = {k: v for k, v in params.items() if v is not None}
    with pytest.raises(ValueError) as err:
        VideoDataConfig.from_json(params)
    message = str(err.value)
    assert f"{KEY}.{key}" in message and repr(value) in message
    assert any(word in message for word in ("valid", "expected", "must", "only", "exactly", "not with")), message


def test_required_geometry_keys_are_named():
    for params, key in [({"force_resolution": False, "num_frames": 93}, "max_hxw"),
                        ({"force_resolution": True, "num_frames": 93, "max_height": 352}, "max_height/max_width"),
                        ({"max_hxw": 225280}, "num_frames")]:
        with pytest.raises(ValueError, match=rf"{KEY}\.{key}: required"):
            VideoDataConfig.from_json(params)
    assert math.isclose(VideoDataConfig.from_json({"max_hxw": 1000, "num_frames": 9}).per_sample.min_hxw, 250)
