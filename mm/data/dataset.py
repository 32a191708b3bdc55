"""The video dataset: frame sampling, resize + crop to a bucket, [-1, 1], optional flip, caption
dropout, tokenisation in the workers, and bad samples skipped and counted.

Buckets are ``(frames, height, width)`` shapes and every micro-batch comes from one bucket
(``BucketSampler``). They come from one of three geometries in ``preprocess_parameters``:

- static resolution: ``num_frames`` with ``max_height``/``max_width``, one bucket;
- listed buckets: ``buckets: [[frames, height, width], ...]``; each sample goes to the bucket whose
  aspect ratio is closest to its own among those it has enough frames for;
- OpenSoraPlan 1.3 (``force_resolution`` or ``max_hxw`` given, see ``PerSampleGeometry``): every
  sample's own shape, computed from its annotation; the buckets are the distinct shapes found.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mm.data.decoding import READERS, BadSample, VideoInfo, read_clip, resolve_reader
from mm.data.sources import Sample

KEY = "dataset_param.preprocess_parameters"
SHORT_CLIP_POLICIES = ("skip", "pad")
# condition frames each dataset type carries (I2V: the first frame; FLF2V: the first and the last)
CONDITION_FRAMES = {"i2v": (0,), "flf2v": (0, -1)}
# MindSpeed-MM's reader names for the readers mm has
READER_ALIASES = {"DecordVideo": "decord", "decoder": "decord"}
DEFAULT_FPS = 24.0  # a clip's fps when its annotation gives none (as OpenSoraPlan assumes)
# use_aesthetic: a clip scoring at most LOW / at least HIGH gets the matching sentence appended
AESTHETIC_LOW, AESTHETIC_HIGH = 4.25, 5.75
AESTHETIC_SENTENCES = {"low": "Its aesthetic quality is low.", "high": "Its aesthetic quality is high."}
# the train_pipeline each OpenSoraPlan geometry stands for, and the params mm reads from its steps
DYNAMIC_PIPELINE = ("ToTensorVideo", "MaxHWResizeVideo", "SpatialStrideCropVideo", "ae_norm")
STATIC_PIPELINE = ("ToTensorVideo", "CenterCropResizeVideo", "ae_norm")
TRANSFORM_PARAMS = {
    "ToTensorVideo": (), "ae_norm": (), "SpatialStrideCropVideo": ("stride",),
    "MaxHWResizeVideo": ("align_corners", "antialias", "transform_size", "interpolation_mode"),
    "CenterCropResizeVideo": ("size", "use_short_edge", "top_crop", "align_corners", "antialias", "transform_size",
                              "interpolation_mode"),
}
# keys that only the OpenSoraPlan geometry reads (it is on when force_resolution or max_hxw is given)
OPENSORAPLAN_ONLY = ("min_num_frames", "vae_scale_factor", "hw_stride", "hw_aspect_thr", "min_hxw", "speed_factor",
                     "drop_short_ratio", "train_pipeline", "video_processor_type")


def _bad(key: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"{KEY}.{key} = {value!r}; {valid}")


def _number(p: dict, key: str, default: Any, kind: type = int, low: float | None = None,
            high: float | None = None) -> Any:
    """``p[key]`` (popped) as ``kind`` within ``[low, high]``, or ``default`` when absent."""
    if key not in p:
        return default
    value = p.pop(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise _bad(key, value, f"expected {'an integer' if kind is int else 'a number'}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _bad(key, value, f"expected a value {bounds}")
    return kind(value)


def _flag(p: dict, key: str, default: bool) -> bool:
    value = p.pop(key, default)
    if not isinstance(value, bool):
        raise _bad(key, value, "expected true or false")
    return value


@dataclass(frozen=True)
class ResizeOptions:
    """How frames are interpolated (``F.interpolate`` bilinear) and, for static resolution, where
    the crop sits (``top_crop``: the top of the frame instead of its centre)."""

    align_corners: bool = True
    antialias: bool = True
    top_crop: bool = False


@dataclass(frozen=True)
class PerSampleGeometry:
    """OpenSoraPlan 1.3's geometry: each sample's own ``(frames, height, width)`` from its annotation
    (``num_frames``, ``fps`` (default 24), ``resolution: {height, width}``).

    Frames: the clip's frame indices at ``train_fps`` (interval ``fps / train_fps``, 1 when the two
    differ by less than 0.1), thinned by ``speed_factor`` when longer than ``num_frames``, at most
    ``num_frames``, then cut to the largest ``y`` with ``(y - 1) % vae_stride_t == 0`` and
    ``y >= min_num_frames``; images are 1 frame. Size, dynamic (``force_size`` None): scaled to
    ``max_hxw`` pixels when larger (both sides ``int()``-ed), then centre-cropped to multiples of
    ``hw_stride``; static: ``force_size`` = (max_height, max_width) by crop-to-aspect and resize.
    ``min_hxw`` defaults to ``max_hxw // 4`` (as OpenSoraPlan's and MindSpeed-MM's trainers set it).
    A sample that does not fit is dropped at start-up with a counted reason; a sample without
    ``resolution`` or (a video) without ``num_frames`` too (the files are not probed at start-up).
    OpenSoraPlan's filter of clips longer than 5 x what training reads is not applied: such a clip
    is cropped in time like any other."""

    num_frames: int
    min_num_frames: int = 29
    vae_stride_t: int = 4
    hw_stride: int = 32
    max_hxw: int | None = None
    min_hxw: int = 0
    hw_aspect_thr: float = 2.0
    force_size: tuple[int, int] | None = None
    speed_factor: float = 1.0
    drop_short_ratio: float = 0.0
    video: ResizeOptions = ResizeOptions()
    image: ResizeOptions = ResizeOptions()

    def scaled(self, height: int, width: int) -> tuple[int, int]:
        """The size before the stride crop: at most ``max_hxw`` pixels."""
        if height * width > self.max_hxw:
            scale = math.sqrt(self.max_hxw / (height * width))
            return int(height * scale), int(width * scale)
        return height, width

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The sample size for an annotated ``height x width``, or a BadSample saying why none."""
        if self.force_size is not None:
            aspect = self.force_size[0] / self.force_size[1]
            if not aspect / self.hw_aspect_thr <= height / width <= aspect * self.hw_aspect_thr:
                raise BadSample("aspect ratio outside hw_aspect_thr", f"{height}x{width}")
            return self.force_size
        h, w = self.scaled(height, width)
        h, w = h - h % self.hw_stride, w - w % self.hw_stride
        if h == 0 or w == 0:
            raise BadSample("smaller than hw_stride", f"{height}x{width}")
        if h * w < self.min_hxw:
            raise BadSample("below min_hxw", f"{height}x{width} -> {h}x{w}")
        if not 1 / self.hw_aspect_thr <= h / w <= self.hw_aspect_thr:
            raise BadSample("aspect ratio outside hw_aspect_thr", f"{height}x{width} -> {h}x{w}")
        return h, w

    def resampled(self, num_frames: int, fps: float, train_fps: float | None) -> np.ndarray:
        """A clip's frame indices at ``train_fps``, thinned by ``speed_factor``."""
        interval = 1.0 if not train_fps or abs(fps - train_fps) < 0.1 else fps / train_fps
        indices = np.arange(0, num_frames, interval).astype(int)
        indices = indices[indices < num_frames]
        if self.speed_factor > 1 and len(indices) > self.num_frames:
            speed = min(self.speed_factor, len(indices) / self.num_frames)
            indices = indices[np.linspace(0, len(indices) - 1, int(len(indices) / speed), dtype=int)]
        return indices

    def frames(self, available: int) -> int:
        """The frame count for ``available`` resampled frames, or a BadSample."""
        for y in range(min(available, self.num_frames), self.min_num_frames - 1, -1):
            if (y - 1) % self.vae_stride_t == 0:
                return y
        raise BadSample("fewer than min_num_frames", f"{available} frames at train_fps")

    def shape(self, sample: Sample, train_fps: float | None, rng: random.Random) -> tuple[int, int, int]:
        """``(frames, height, width)`` of ``sample``; ``rng`` draws the ``drop_short_ratio`` coin."""
        if not sample.height or not sample.width or sample.height <= 0 or sample.width <= 0:
            raise BadSample("no resolution in annotation", sample.path)
        height, width = self.size(sample.height, sample.width)
        if sample.is_image:
            return 1, height, width
        if not sample.num_frames:
            raise BadSample("no num_frames in annotation", sample.path)
        available = len(self.resampled(sample.num_frames, sample.fps or DEFAULT_FPS, train_fps))
        if available < self.num_frames and rng.random() < self.drop_short_ratio:
            raise BadSample("shorter than num_frames (drop_short_ratio)", f"{available} frames")
        return self.frames(available), height, width

    def clip_indices(self, sample: Sample, frames: int, train_fps: float | None, rng: random.Random,
                     info: VideoInfo) -> list[int]:
        """``frames`` consecutive resampled indices from a random start (the annotation's numbers
        made the shape, so they choose the frames too); a file shorter than its annotation is a
        BadSample."""
        if sample.is_image:
            return [0]
        indices = self.resampled(sample.num_frames, sample.fps or DEFAULT_FPS, train_fps)
        start = rng.randint(0, len(indices) - frames)
        chosen = indices[start:start + frames].tolist()
        if chosen[-1] >= info.num_frames:
            raise BadSample("too short", f"{info.num_frames} frames, annotation says {sample.num_frames}")
        return chosen

    def transform(self, video: torch.Tensor, height: int, width: int, is_image: bool) -> torch.Tensor:
        """``[T, C, H, W]`` float to ``[T, C, height, width]`` as the train_pipeline says."""
        opts = self.image if is_image else self.video
        h, w = video.shape[-2:]
        if self.force_size is None:
            th, tw = self.scaled(h, w)
            if (th - th % self.hw_stride, tw - tw % self.hw_stride) != (height, width):
                raise BadSample("size differs from annotation", f"{h}x{w} frames, bucket {height}x{width}")
            top, left = (th - height) // 2, (tw - width) // 2
            return _resize(video, th, tw, opts)[..., top:top + height, left:left + width]
        ratio = height / width  # the largest region of the target's aspect, then resized to it
        ch, cw = (int(w * ratio), w) if h / w > ratio else (h, int(h / ratio))
        top = 0 if opts.top_crop else int(round((h - ch) / 2))
        left = int(round((w - cw) / 2))
        return _resize(video[..., top:top + ch, left:left + cw], height, width, opts)


def _resize(video: torch.Tensor, height: int, width: int, opts: ResizeOptions) -> torch.Tensor:
    if video.shape[-2:] == (height, width):
        return video
    return F.interpolate(video, size=(height, width), mode="bilinear", align_corners=opts.align_corners,
                         antialias=opts.antialias)


def _pipeline(value: Any, static: bool, hw_stride: int, force_size: tuple[int, int] | None) -> dict[str, ResizeOptions]:
    """``train_pipeline`` checked against the one the geometry stands for; the resize options it sets
    for ``video`` (and ``image``, which defaults to the video's)."""
    key = "train_pipeline"
    expected = STATIC_PIPELINE if static else DYNAMIC_PIPELINE
    mode = f"force_resolution {'true' if static else 'false'}"
    if not isinstance(value, dict) or not value or not set(value) <= {"video", "image"}:
        raise _bad(key, value, "expected {\"video\": [steps], \"image\": [steps] (optional)}")
    options = {}
    for kind, steps in value.items():
        if not isinstance(steps, list) or not all(isinstance(s, dict) and "trans_type" in s for s in steps):
            raise _bad(f"{key}.{kind}", steps, "expected a list of {\"trans_type\": ..., \"param\": {...}}")
        for j, step in enumerate(steps):
            name = step["trans_type"]
            if name not in TRANSFORM_PARAMS:
                raise _bad(f"{key}.{kind}[{j}].trans_type", name,
                           f"valid with {mode}: {', '.join(expected)} (mm implements {', '.join(TRANSFORM_PARAMS)})")
            extra = set(step) - {"trans_type", "param"}
            if extra:
                raise _bad(f"{key}.{kind}[{j}]", sorted(extra), "a step has only 'trans_type' and 'param'")
        names = tuple(s["trans_type"] for s in steps)
        if names != expected:
            raise _bad(f"{key}.{kind}", list(names), f"with {mode} mm does exactly {list(expected)}")
        found: dict[str, Any] = {}
        for j, step in enumerate(steps):
            where, params = f"{key}.{kind}[{j}].param", step.get("param") or {}
            for name, v in params.items():
                if name not in TRANSFORM_PARAMS[step["trans_type"]]:
                    raise _bad(f"{where}.{name}", v, f"{step['trans_type']} takes "
                               f"{', '.join(TRANSFORM_PARAMS[step['trans_type']]) or 'no params'}")
                valid = _param_problem(name, v, hw_stride, force_size)
                if valid:
                    raise _bad(f"{where}.{name}", v, valid)
                found[name] = v
        options[kind] = ResizeOptions(found.get("align_corners", True), found.get("antialias", True),
                                      found.get("top_crop", False))
    options.setdefault("image", options["video"])
    return options


def _param_problem(name: str, value: Any, hw_stride: int, force_size: tuple[int, int] | None) -> str | None:
    """What a train_pipeline param must be, when ``value`` is not that; else None."""
    if name == "stride":
        return None if value == hw_stride else f"must equal hw_stride = {hw_stride}"
    if name == "size":
        ok = force_size is not None and isinstance(value, list) and value == list(force_size)
        return None if ok else f"must equal [max_height, max_width] = {list(force_size or ())}"
    if name == "transform_size":
        return None if value == "auto" else "valid: 'auto' (the size comes from max_hxw or max_height/max_width)"
    if name == "use_short_edge":
        return None if value is False else "valid: false (a square short-edge crop is not implemented)"
    if name == "interpolation_mode":
        return None if value == "bilinear" else "valid: 'bilinear'"
    return None if isinstance(value, bool) else "expected true or false"


def _opensoraplan(p: dict) -> PerSampleGeometry:
    """Pops the OpenSoraPlan geometry's keys from ``p``."""
    static = _flag(p, "force_resolution", False)
    if "num_frames" not in p:
        raise ValueError(f"{KEY}.num_frames: required (the most frames a sample gets)")
    num_frames = _number(p, "num_frames", None, low=1)
    min_num_frames = _number(p, "min_num_frames", min(29, num_frames), low=1, high=num_frames)
    vae = p.pop("vae_scale_factor", [4, 8, 8])
    if not isinstance(vae, list) or len(vae) != 3 or not all(isinstance(v, int) and v >= 1 for v in vae):
        raise _bad("vae_scale_factor", vae, "expected [temporal, height, width] factors, integers >= 1")
    hw_stride = _number(p, "hw_stride", 32, low=1)
    if static:
        for other in ("max_hxw", "min_hxw"):
            if other in p:
                raise _bad(other, p[other], "read only with force_resolution false (dynamic resolution)")
        if "max_height" not in p or "max_width" not in p:
            raise ValueError(f"{KEY}.max_height/max_width: required with force_resolution true "
                             "(the size of every sample)")
        force_size = (_number(p, "max_height", None, low=1), _number(p, "max_width", None, low=1))
        max_hxw, min_hxw = None, 0
    else:
        for other in ("max_height", "max_width"):
            if other in p:
                raise _bad(other, p[other], "read only with force_resolution true; dynamic resolution uses max_hxw")
        if "max_hxw" not in p:
            raise ValueError(f"{KEY}.max_hxw: required with force_resolution false (the most pixels of a sample)")
        max_hxw = _number(p, "max_hxw", None, low=1)
        min_hxw = _number(p, "min_hxw", max_hxw // 4, low=0)
        force_size = None
        if hw_stride % vae[1] or hw_stride % vae[2]:
            raise _bad("hw_stride", hw_stride, f"must be a multiple of vae_scale_factor[1:] = {vae[1:]}")
    if "video_processor_type" in p and p["video_processor_type"] != "OpensoraplanVideoProcessor":
        raise _bad("video_processor_type", p["video_processor_type"], "valid: 'OpensoraplanVideoProcessor'")
    p.pop("video_processor_type", None)
    pipeline = _pipeline(p.pop("train_pipeline"), static, hw_stride, force_size) if "train_pipeline" in p else {}
    return PerSampleGeometry(
        num_frames=num_frames, min_num_frames=min_num_frames, vae_stride_t=vae[0], hw_stride=hw_stride,
        max_hxw=max_hxw, min_hxw=min_hxw, hw_aspect_thr=_number(p, "hw_aspect_thr", 2.0, float, low=1.0),
        force_size=force_size, speed_factor=_number(p, "speed_factor", 1.0, float, low=1.0),
        drop_short_ratio=_number(p, "drop_short_ratio", 0.0, float, low=0.0, high=1.0),
        video=pipeline.get("video", ResizeOptions()), image=pipeline.get("image", ResizeOptions()))


@dataclass
class VideoDataConfig:
    """``dataset_param.preprocess_parameters`` of the data JSON, typed.

    Keys read in every geometry, beside the geometry's own: ``train_fps``, ``seed``, ``hflip``,
    ``short_clip`` (skip | pad; listed buckets and static resolution), ``max_substitutes``,
    ``video_reader_type`` (auto | decord | pyav; MindSpeed-MM's DecordVideo and decoder are decord),
    ``image_reader_type`` (Image: PIL), ``frame_interval`` (1: the interval comes from fps and
    train_fps), ``cfg`` (probability that a caption is replaced by "" for classifier-free guidance,
    drawn from (seed, epoch, index)), ``use_aesthetic`` (append mm's own sentence -
    ``AESTHETIC_SENTENCES``, not OpenSoraPlan's phrases - to captions whose annotated ``aesthetic``
    is at most 4.25 or at least 5.75), ``min_bucket_samples`` (samples of a bucket holding fewer are
    dropped and counted; OpenSoraPlan uses 4 x the global batch size)."""

    buckets: list[tuple[int, int, int]]  # (frames, height, width); empty with per_sample
    train_fps: float | None = None  # None: every source frame (stride 1)
    short_clip: str = "skip"
    hflip: bool = False
    video_reader_type: str = "auto"
    max_substitutes: int = 8  # how many other samples to try in place of a bad one
    seed: int = 42
    dataset_type: str = "t2v"
    per_sample: PerSampleGeometry | None = None  # OpenSoraPlan 1.3: every sample's own shape
    cfg: float = 0.0
    use_aesthetic: bool = False
    min_bucket_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, params: dict[str, Any], dataset_type: str = "t2v") -> "VideoDataConfig":
        key = KEY
        p = dict(params)
        per_sample = None
        if "force_resolution" in p or "max_hxw" in p:
            if "buckets" in p:
                raise _bad("buckets", p["buckets"], "not with force_resolution/max_hxw (the OpenSoraPlan geometry "
                           "makes every sample's own bucket); give one or the other")
            per_sample = _opensoraplan(p)
            buckets = []
        else:
            for name in OPENSORAPLAN_ONLY:
                if name in p and not (name == "speed_factor" and p[name] == 1):
                    raise _bad(name, p[name], "read only with the OpenSoraPlan geometry (give force_resolution "
                               "and max_hxw or max_height/max_width)")
            p.pop("speed_factor", None)
            if "buckets" in p:
                buckets = [tuple(int(v) for v in b) for b in p.pop("buckets")]
            else:
                try:
                    buckets = [(int(p.pop("num_frames")), int(p.pop("max_height", p.pop("height", 0)) or 0),
                                int(p.pop("max_width", p.pop("width", 0)) or 0))]
                except KeyError:
                    raise ValueError(f"{key}: give 'buckets' (dynamic resolution) or 'num_frames' with "
                                     "'max_height'/'max_width' (static resolution)") from None
            for b in buckets:
                if len(b) != 3 or min(b) < 1:
                    raise ValueError(f"{key}.buckets entry {list(b)}: expected [frames, height, width], all >= 1")
        short = p.pop("short_clip", "skip")
        if short not in SHORT_CLIP_POLICIES or (per_sample is not None and short != "skip"):
            valid = "skip (the OpenSoraPlan geometry cuts every clip to frames it has)" if per_sample else \
                ", ".join(SHORT_CLIP_POLICIES)
            raise ValueError(f"{key}.short_clip = {short!r}; valid: {valid}")
        reader = p.pop("video_reader_type", "auto")
        if reader not in READERS and reader not in READER_ALIASES:
            raise _bad("video_reader_type", reader, f"valid: {', '.join(READERS + tuple(READER_ALIASES))}")
        reader = READER_ALIASES.get(reader, reader)
        resolve_reader(reader)
        if p.get("image_reader_type", "Image") != "Image":
            raise _bad("image_reader_type", p["image_reader_type"], "valid: 'Image' (PIL)")
        p.pop("image_reader_type", None)
        if p.get("frame_interval", 1) != 1:
            raise _bad("frame_interval", p["frame_interval"], "valid: 1 (mm takes every fps / train_fps-th frame)")
        p.pop("frame_interval", None)
        fps = p.pop("train_fps", None)
        return cls(buckets=buckets, train_fps=float(fps) if fps else None, short_clip=short,
                   hflip=bool(p.pop("hflip", False)), video_reader_type=reader,
                   max_substitutes=int(p.pop("max_substitutes", 8)), seed=int(p.pop("seed", 42)),
                   dataset_type=dataset_type, per_sample=per_sample,
                   cfg=_number(p, "cfg", 0.0, float, low=0.0, high=1.0), use_aesthetic=_flag(p, "use_aesthetic", False),
                   min_bucket_samples=_number(p, "min_bucket_samples", 0, low=0), extra=p)


def _seed(*parts: int) -> int:
    """A seed from integers, the same in every process (str hashes are salted per process)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (1 << 61)
    return value


def frame_indices(available: int, src_fps: float, wanted: int, train_fps: float | None, short_clip: str,
                  rng: random.Random) -> list[int]:
    """``wanted`` frame indices at ``train_fps`` (stride from the source fps), from a random start.
    A clip too short is padded with its last frame (``short_clip: pad``) or is a BadSample."""
    stride = max(1, round(src_fps / train_fps)) if train_fps and src_fps else 1
    span = (wanted - 1) * stride + 1
    if span <= available:
        start = rng.randint(0, available - span)
        return list(range(start, start + span, stride))
    if short_clip == "pad":
        return [min(i * stride, available - 1) for i in range(wanted)]
    raise BadSample("too short", f"{available} frames, {wanted} needed at stride {stride}")


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[T, C, H, W]`` float: scale so the frame covers ``height x width``, then crop the centre."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale))
    video = F.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[..., top:top + height, left:left + width]


def aesthetic_caption(caption: str, score: float) -> str:
    """``caption`` with mm's sentence for a low or high aesthetic score appended (else unchanged)."""
    if score <= AESTHETIC_LOW:
        return f"{caption} {AESTHETIC_SENTENCES['low']}"
    if score >= AESTHETIC_HIGH:
        return f"{caption} {AESTHETIC_SENTENCES['high']}"
    return caption


class VideoDataset(torch.utils.data.Dataset):
    """Item ``i``: ``{"video": [3, T, H, W] in [-1, 1], "caption", "bucket", "path", "skipped"}`` (plus
    ``input_ids``/``attention_mask`` with a tokenizer, and ``condition_frames [3, n, H, W]`` for I2V
    (first frame) and FLF2V (first and last)). ``buckets[item["bucket"]]`` is its (frames, height,
    width). Images are 1-frame samples; with listed buckets they need a 1-frame bucket, without one
    they are left out when the dataset is built. Every sample left out at build time is counted by
    reason in ``dropped``. A bad sample is replaced by another of the same bucket; what was skipped,
    and why, travels in ``skipped``."""

    def __init__(self, samples: list[Sample], config: VideoDataConfig, tokenizer=None, max_length: int = 512,
                 epoch: int = 0):
        self.samples, self.config, self.tokenizer, self.max_length = samples, config, tokenizer, max_length
        self.reader = resolve_reader(config.video_reader_type)
        self.epoch = epoch
        self.dropped: Counter = Counter()
        if config.per_sample is not None:
            shapes = self._own_shapes()
            self.buckets = sorted(set(shapes))
            number = {shape: i for i, shape in enumerate(self.buckets)}
            bucket_of = [number[s] for s in shapes]
        else:
            if not any(b[0] == 1 for b in config.buckets):
                kept = [s for s in self.samples if not s.is_image]
                if len(kept) < len(self.samples):
                    self.dropped["image without a 1-frame bucket"] = len(self.samples) - len(kept)
                self.samples = kept
            self.buckets = list(config.buckets)
            bucket_of = [self._bucket(s) for s in self.samples]
        if config.min_bucket_samples:
            sizes = Counter(bucket_of)
            keep = [sizes[b] >= config.min_bucket_samples for b in bucket_of]
            if not all(keep):
                self.dropped["minority shape (min_bucket_samples)"] += keep.count(False)
            self.samples = [s for s, k in zip(self.samples, keep) if k]
            bucket_of = [b for b, k in zip(bucket_of, keep) if k]
        if not self.samples:
            where = f"buckets {config.buckets}" if config.per_sample is None else f"{config.per_sample}"
            raise ValueError(f"no usable samples for {where} ({dict(self.dropped)})")
        self.bucket_of = bucket_of
        self.by_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            self.by_bucket.setdefault(b, []).append(i)

    def _own_shapes(self) -> list[tuple[int, int, int]]:
        """Each sample's OpenSoraPlan shape; samples without one leave ``self.samples``, counted."""
        kept, shapes = [], []
        for i, sample in enumerate(self.samples):
            try:
                shapes.append(self.config.per_sample.shape(sample, self.config.train_fps,
                                                           random.Random(_seed(self.config.seed, i, 3))))
                kept.append(sample)
            except BadSample as bad:
                self.dropped[bad.reason] += 1
        self.samples = kept
        return shapes

    def _bucket(self, sample: Sample) -> int:
        buckets = self.config.buckets
        if sample.is_image:
            buckets_1 = [i for i, b in enumerate(buckets) if b[0] == 1]
            ratio = (sample.height / sample.width) if sample.height and sample.width else 1.0
            return min(buckets_1, key=lambda i: abs(math.log(buckets[i][1] / buckets[i][2] / ratio)))
        if len(buckets) == 1:
            return 0
        frames = sample.num_frames or 1
        ratio = (sample.height / sample.width) if sample.height and sample.width else 1.0
        video_buckets = [i for i, b in enumerate(buckets) if b[0] > 1] or list(range(len(buckets)))
        fitting = [i for i in video_buckets if buckets[i][0] <= frames] or [min(video_buckets,
                                                                                key=lambda i: buckets[i][0])]
        best_ratio = min(abs(math.log(buckets[i][1] / buckets[i][2] / ratio)) for i in fitting)
        close = [i for i in fitting if abs(math.log(buckets[i][1] / buckets[i][2] / ratio)) <= best_ratio + 1e-9]
        return max(close, key=lambda i: buckets[i][0])  # the most frames among the best-shaped

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int) -> str:
        """Sample ``index``'s caption this epoch: the aesthetic sentence (``use_aesthetic``), then
        replaced by "" with probability ``cfg``."""
        sample = self.samples[index]
        caption = sample.caption
        if self.config.use_aesthetic and sample.aesthetic is not None:
            caption = aesthetic_caption(caption, sample.aesthetic)
        if self.config.cfg and random.Random(_seed(self.config.seed, self.epoch, index, 2)).random() < self.config.cfg:
            return ""
        return caption

    def _load(self, index: int) -> dict:
        sample, bucket = self.samples[index], self.bucket_of[index]
        frames, height, width = self.buckets[bucket]
        geometry = self.config.per_sample
        rng = random.Random(_seed(self.config.seed, self.epoch, index, 0))
        if geometry is not None:
            raw = read_clip(sample.path, self.reader, lambda info: geometry.clip_indices(
                sample, frames, self.config.train_fps, rng, info))
        elif sample.is_image:
            raw = read_clip(sample.path, self.reader, lambda info: [0] * frames)
        else:
            raw = read_clip(sample.path, self.reader, lambda info: frame_indices(
                info.num_frames, info.fps, frames, self.config.train_fps, self.config.short_clip, rng))  # [T, H, W, 3]
        video = torch.from_numpy(np.ascontiguousarray(raw)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if geometry is not None:
            video = geometry.transform(video, height, width, sample.is_image)
        else:
            video = resize_center_crop(video, height, width)
        if self.config.hflip and rng.random() < 0.5:
            video = video.flip(-1)
        caption = self.caption(index)
        item = {"video": video.permute(1, 0, 2, 3).contiguous(), "caption": caption, "bucket": bucket,
                "path": sample.path}
        if self.config.dataset_type in CONDITION_FRAMES:
            item["condition_frames"] = item["video"][:, list(CONDITION_FRAMES[self.config.dataset_type])]
        if self.tokenizer is not None:
            tok = self.tokenizer(caption, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            item["input_ids"], item["attention_mask"] = tok.input_ids[0], tok.attention_mask[0]
        return item

    def __getitem__(self, index: int) -> dict:
        skipped = []
        peers = self.by_bucket[self.bucket_of[index]]
        rng = random.Random(_seed(self.config.seed, self.epoch, index, 1))
        candidate = index
        for _ in range(self.config.max_substitutes + 1):
            try:
                item = self._load(candidate)
                item["skipped"] = skipped
                return item
            except BadSample as bad:
                skipped.append((self.samples[candidate].path, bad.reason))
                candidate = rng.choice(peers)
        raise RuntimeError(f"{len(skipped)} bad samples in a row in bucket {self.bucket_of[index]}: {skipped}; "
                           "the dataset looks broken (increase preprocess_parameters.max_substitutes to keep going)")


class SkipCounter:
    """Running count of skipped samples by reason, for the periodic rank-0 summary."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def update(self, batch: dict) -> None:
        for _, reason in batch.get("skipped", []):
            self.counts[reason] += 1

    def summary(self) -> str:
        total = sum(self.counts.values())
        return f"skipped {total} bad samples" + (f" ({dict(self.counts)})" if total else "")


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items; the skipped lists are concatenated."""
    out = {"video": torch.stack([i["video"] for i in items]), "caption": [i["caption"] for i in items],
           "bucket": items[0]["bucket"], "path": [i["path"] for i in items],
           "skipped": [s for i in items for s in i["skipped"]]}
    if "condition_frames" in items[0]:
        out["condition_frames"] = torch.stack([i["condition_frames"] for i in items])
    if "input_ids" in items[0]:
        out["input_ids"] = torch.stack([i["input_ids"] for i in items])
        out["attention_mask"] = torch.stack([i["attention_mask"] for i in items])
    return out
