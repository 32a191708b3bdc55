"""OpenSoraPlan 1.3's per-sample geometry of a data JSON's ``preprocess_parameters``: each sample's
(frames, height, width) from its annotation (dynamic resolution under ``max_hxw``, or the static
``max_height`` x ``max_width``), which samples are dropped and why, and the resize/crop options of the
``train_pipeline`` it names. ``mm.data.dataset`` turns the shapes into buckets."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mm.data.decoding import BadSample, VideoInfo
from mm.data.sources import Sample

KEY = "dataset_param.preprocess_parameters"
# MindSpeed-MM's reader names for the readers mm has
READER_ALIASES = {"DecordVideo": "decord", "decoder": "decord"}
DEFAULT_FPS = 24.0  # a clip's fps when its annotation gives none (as OpenSoraPlan assumes)
# use_aesthetic: a clip scoring at most LOW / at least HIGH gets the matching sentence appended
AESTHETIC_LOW, AESTHETIC_HIGH = 4.25, 5.75
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


def bad_value(key: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"{KEY}.{key} = {value!r}; {valid}")


def number_key(p: dict, key: str, default: Any, kind: type = int, low: float | None = None,
            high: float | None = None) -> Any:
    """``p[key]`` (popped) as ``kind`` within ``[low, high]``, or ``default`` when absent."""
    if key not in p:
        return default
    value = p.pop(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise bad_value(key, value, f"expected {'an integer' if kind is int else 'a number'}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad_value(key, value, f"expected a value {bounds}")
    return kind(value)


def flag_key(p: dict, key: str, default: bool) -> bool:
    value = p.pop(key, default)
    if not isinstance(value, bool):
        raise bad_value(key, value, "expected true or false")
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


# MindSpeed-MM's Wan data JSONs (dynamic resolution): the video resized to cover the sample's size (short side),
# centre-cropped to it and normalised to [-1, 1] -- mm's dynamic crop, whose resize scale is MaxHWResizeVideo's
# (the two differ only where the stride rounding changes the aspect) -- and the I2V first frame's CLIP and VAE
# inputs, which mm's image encoder and VAE conditioning make themselves; those two must be exactly these.
_AUTO = {"transform_size": "auto"}
WAN_PIPELINE = {
    "video_and_first_frame": (("ResizeVideo", {**_AUTO, "mode": "shortside", "interpolation_mode": "bilinear"}),
                              ("ToTensorVideo", {})),
    "video_only": (("CenterCropResizeVideo", {**_AUTO, "use_short_edge": False, "top_crop": False}),
                   ("norm_fun", {"mean": 0.5, "std": 0.5})),
    "first_frame_clip": (("ResizeVideo", {"transform_size": {"max_height": 224, "max_width": 224}, "mode": "resize",
                                          "interpolation_mode": "bicubic", "align_corners": False, "antialias": False}),
                         ("norm_fun", {"mean": [0.48145466, 0.4578275, 0.40821073],
                                       "std": [0.26862954, 0.26130258, 0.27577711]})),
    "first_frame_vae": (("ResizeVideo", {**_AUTO, "mode": "resize", "interpolation_mode": "bilinear",
                                         "align_corners": False, "antialias": False}),
                        ("norm_fun", {"mean": 0.5, "std": 0.5})),
}
_FREE = ("align_corners", "antialias")  # of the video steps: how the frames are interpolated


def _wan_pipeline(value: dict) -> dict[str, ResizeOptions]:
    """MindSpeed-MM's Wan ``train_pipeline`` (``WAN_PIPELINE``'s keys) checked step by step; the video's resize
    options (from its centre crop)."""
    options = ResizeOptions(align_corners=False, antialias=True)
    if "video_and_first_frame" not in value or "video_only" not in value:
        raise bad_value("train_pipeline", sorted(value), "Wan's layout needs video_and_first_frame and video_only")
    for kind, steps in value.items():
        expected = WAN_PIPELINE[kind]
        names = [s.get("trans_type") if isinstance(s, dict) else s for s in steps] if isinstance(steps, list) else steps
        if names != [name for name, _ in expected]:
            raise bad_value(f"train_pipeline.{kind}", names, f"mm does exactly {[name for name, _ in expected]}")
        for j, (step, (name, fixed)) in enumerate(zip(steps, expected)):
            params = dict(step.get("param") or {})
            free = {k: params.pop(k) for k in _FREE if k in params and k not in fixed and kind != "first_frame_clip"}
            for k, v in free.items():
                if not isinstance(v, bool):
                    raise bad_value(f"train_pipeline.{kind}[{j}].param.{k}", v, "expected true or false")
            if name == "CenterCropResizeVideo":
                options = ResizeOptions(align_corners=free.get("align_corners", False),
                                        antialias=free.get("antialias", True))
            wrong = {k: v for k, v in params.items() if fixed.get(k, object()) != v}
            if wrong or set(fixed) - set(params) - {"mode", "interpolation_mode", "align_corners", "antialias",
                                                   "use_short_edge", "top_crop"}:
                raise bad_value(f"train_pipeline.{kind}[{j}].param", step.get("param"), f"valid: {fixed} "
                                f"(with {' / '.join(_FREE)} true or false where not given)")
    return {"video": options, "image": options}


def _pipeline(value: Any, static: bool, hw_stride: int, force_size: tuple[int, int] | None) -> dict[str, ResizeOptions]:
    """``train_pipeline`` checked against the one the geometry stands for; the resize options it sets
    for ``video`` (and ``image``, which defaults to the video's)."""
    key = "train_pipeline"
    if isinstance(value, dict) and value and set(value) <= set(WAN_PIPELINE) and not static:
        return _wan_pipeline(value)
    expected = STATIC_PIPELINE if static else DYNAMIC_PIPELINE
    mode = f"force_resolution {'true' if static else 'false'}"
    if not isinstance(value, dict) or not value or not set(value) <= {"video", "image"}:
        raise bad_value(key, value, "expected {\"video\": [steps], \"image\": [steps] (optional)}")
    options = {}
    for kind, steps in value.items():
        if not isinstance(steps, list) or not all(isinstance(s, dict) and "trans_type" in s for s in steps):
            raise bad_value(f"{key}.{kind}", steps, "expected a list of {\"trans_type\": ..., \"param\": {...}}")
        for j, step in enumerate(steps):
            name = step["trans_type"]
            if name not in TRANSFORM_PARAMS:
                raise bad_value(f"{key}.{kind}[{j}].trans_type", name,
                           f"valid with {mode}: {', '.join(expected)} (mm implements {', '.join(TRANSFORM_PARAMS)})")
            extra = set(step) - {"trans_type", "param"}
            if extra:
                raise bad_value(f"{key}.{kind}[{j}]", sorted(extra), "a step has only 'trans_type' and 'param'")
        names = tuple(s["trans_type"] for s in steps)
        if names != expected:
            raise bad_value(f"{key}.{kind}", list(names), f"with {mode} mm does exactly {list(expected)}")
        found: dict[str, Any] = {}
        for j, step in enumerate(steps):
            where, params = f"{key}.{kind}[{j}].param", step.get("param") or {}
            for name, v in params.items():
                if name not in TRANSFORM_PARAMS[step["trans_type"]]:
                    raise bad_value(f"{where}.{name}", v, f"{step['trans_type']} takes "
                               f"{', '.join(TRANSFORM_PARAMS[step['trans_type']]) or 'no params'}")
                valid = _param_problem(name, v, hw_stride, force_size)
                if valid:
                    raise bad_value(f"{where}.{name}", v, valid)
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


def per_sample_geometry(p: dict) -> PerSampleGeometry:
    """Pops the OpenSoraPlan geometry's keys from ``p``."""
    static = flag_key(p, "force_resolution", False)
    if "num_frames" not in p:
        raise ValueError(f"{KEY}.num_frames: required (the most frames a sample gets)")
    num_frames = number_key(p, "num_frames", None, low=1)
    min_num_frames = number_key(p, "min_num_frames", min(29, num_frames), low=1, high=num_frames)
    vae = p.pop("vae_scale_factor", [4, 8, 8])
    if not isinstance(vae, list) or len(vae) != 3 or not all(isinstance(v, int) and v >= 1 for v in vae):
        raise bad_value("vae_scale_factor", vae, "expected [temporal, height, width] factors, integers >= 1")
    hw_stride = number_key(p, "hw_stride", 32, low=1)
    if static:
        for other in ("max_hxw", "min_hxw"):
            if other in p:
                raise bad_value(other, p[other], "read only with force_resolution false (dynamic resolution)")
        if "max_height" not in p or "max_width" not in p:
            raise ValueError(f"{KEY}.max_height/max_width: required with force_resolution true "
                             "(the size of every sample)")
        force_size = (number_key(p, "max_height", None, low=1), number_key(p, "max_width", None, low=1))
        max_hxw, min_hxw = None, 0
    else:
        for other in ("max_height", "max_width"):
            if other in p:
                raise bad_value(other, p[other], "read only with force_resolution true; dynamic resolution uses max_hxw")
        if "max_hxw" not in p:
            raise ValueError(f"{KEY}.max_hxw: required with force_resolution false (the most pixels of a sample)")
        max_hxw = number_key(p, "max_hxw", None, low=1)
        min_hxw = number_key(p, "min_hxw", max_hxw // 4, low=0)
        force_size = None
        if hw_stride % vae[1] or hw_stride % vae[2]:
            raise bad_value("hw_stride", hw_stride, f"must be a multiple of vae_scale_factor[1:] = {vae[1:]}")
    if "video_processor_type" in p and p["video_processor_type"] != "OpensoraplanVideoProcessor":
        raise bad_value("video_processor_type", p["video_processor_type"], "valid: 'OpensoraplanVideoProcessor'")
    p.pop("video_processor_type", None)
    pipeline = _pipeline(p.pop("train_pipeline"), static, hw_stride, force_size) if "train_pipeline" in p else {}
    return PerSampleGeometry(
        num_frames=num_frames, min_num_frames=min_num_frames, vae_stride_t=vae[0], hw_stride=hw_stride,
        max_hxw=max_hxw, min_hxw=min_hxw, hw_aspect_thr=number_key(p, "hw_aspect_thr", 2.0, float, low=1.0),
        force_size=force_size, speed_factor=number_key(p, "speed_factor", 1.0, float, low=1.0),
        drop_short_ratio=number_key(p, "drop_short_ratio", 0.0, float, low=0.0, high=1.0),
        video=pipeline.get("video", ResizeOptions()), image=pipeline.get("image", ResizeOptions()))
