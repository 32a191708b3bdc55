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
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mm.data.captions import clean_caption
from mm.data.decoding import READERS, BadSample, read_clip, resolve_reader
from mm.data.geometry import AESTHETIC_HIGH, AESTHETIC_LOW, KEY, OPENSORAPLAN_ONLY, READER_ALIASES, PerSampleGeometry, bad_value, flag_key, number_key, per_sample_geometry
from mm.data.sources import Sample

SHORT_CLIP_POLICIES = ("skip", "pad")
# condition frames each dataset type carries (I2V: the first frame; FLF2V: the first and the last)
CONDITION_FRAMES = {"i2v": (0,), "flf2v": (0, -1)}
AESTHETIC_SENTENCES = {"low": "Its aesthetic quality is low.", "high": "Its aesthetic quality is high."}


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
                raise bad_value("buckets", p["buckets"], "not with force_resolution/max_hxw (the OpenSoraPlan geometry "
                           "makes every sample's own bucket); give one or the other")
            per_sample = per_sample_geometry(p)
            buckets = []
        else:
            for name in OPENSORAPLAN_ONLY:
                if name in p and not (name == "speed_factor" and p[name] == 1):
                    raise bad_value(name, p[name], "read only with the OpenSoraPlan geometry (give force_resolution "
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
            raise bad_value("video_reader_type", reader, f"valid: {', '.join(READERS + tuple(READER_ALIASES))}")
        reader = READER_ALIASES.get(reader, reader)
        resolve_reader(reader)
        if p.get("image_reader_type", "Image") != "Image":
            raise bad_value("image_reader_type", p["image_reader_type"], "valid: 'Image' (PIL)")
        p.pop("image_reader_type", None)
        if p.get("frame_interval", 1) != 1:
            raise bad_value("frame_interval", p["frame_interval"], "valid: 1 (mm takes every fps / train_fps-th frame)")
        p.pop("frame_interval", None)
        fps = p.pop("train_fps", None)
        return cls(buckets=buckets, train_fps=float(fps) if fps else None, short_clip=short,
                   hflip=bool(p.pop("hflip", False)), video_reader_type=reader,
                   max_substitutes=int(p.pop("max_substitutes", 8)), seed=int(p.pop("seed", 42)),
                   dataset_type=dataset_type, per_sample=per_sample,
                   cfg=number_key(p, "cfg", 0.0, float, low=0.0, high=1.0), use_aesthetic=flag_key(p, "use_aesthetic", False),
                   min_bucket_samples=number_key(p, "min_bucket_samples", 0, low=0), extra=p)


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
    the caption's tokens for each tokenizer (``token_keys``: ``input_ids``/``attention_mask`` of the
    first, ``input_ids_2``/``attention_mask_2`` of the second, ...), and ``condition_frames [3, n, H, W]`` for I2V
    (first frame) and FLF2V (first and last)). ``buckets[item["bucket"]]`` is its (frames, height,
    width). Images are 1-frame samples; with listed buckets they need a 1-frame bucket, without one
    they are left out when the dataset is built. Every sample left out at build time is counted by
    reason in ``dropped``. A bad sample is replaced by another of the same bucket; what was skipped,
    and why, travels in ``skipped``."""

    def __init__(self, samples: list[Sample], config: VideoDataConfig, tokenizers: list | None = None,
                 epoch: int = 0, text_clean: Sequence[str] = ()):
        """``tokenizers``: (tokenizer, max_length) pairs, one per text encoder; ``text_clean``: the caption
        cleaning methods (``mm.data.captions``) applied before tokenization."""
        self.samples, self.config, self.tokenizers = samples, config, list(tokenizers or [])
        self.text_clean = tuple(text_clean)
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
        caption = clean_caption(sample.caption, self.text_clean) if self.text_clean else sample.caption
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
        for (tokenizer, max_length), (ids_key, mask_key) in zip(self.tokenizers, token_keys(len(self.tokenizers))):
            tok = tokenizer(caption, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            item[ids_key], item[mask_key] = tok.input_ids[0], tok.attention_mask[0]
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
    """Running count of skipped samples by reason, for the periodic summary; ``ranks``: how many
    data-parallel ranks' counts it sums (``gathered``)."""

    def __init__(self, counts: Counter | None = None, ranks: int = 1) -> None:
        self.counts: Counter = Counter() if counts is None else counts
        self.ranks = ranks

    def update(self, batch: dict) -> None:
        for _, reason in batch.get("skipped", []):
            self.counts[reason] += 1

    def gathered(self, group=None) -> "SkipCounter":
        """The counts summed over the ranks of the process group ``group`` (default: all ranks); every
        rank of the group must call this."""
        if not dist.is_available() or not dist.is_initialized():
            return SkipCounter(Counter(self.counts))
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, dict(self.counts), group=group)
        total: Counter = Counter()
        for counts in everyone:
            total.update(counts)
        return SkipCounter(total, ranks=len(everyone))

    def summary(self) -> str:
        total = sum(self.counts.values())
        where = f" on {self.ranks} data-parallel ranks" if self.ranks > 1 else ""
        return f"skipped {total} bad samples{where}" + (f" ({dict(sorted(self.counts.items()))})" if total else "")


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items; the skipped lists are concatenated."""
    out = {"video": torch.stack([i["video"] for i in items]), "caption": [i["caption"] for i in items],
           "bucket": items[0]["bucket"], "path": [i["path"] for i in items],
           "skipped": [s for i in items for s in i["skipped"]]}
    if "condition_frames" in items[0]:
        out["condition_frames"] = torch.stack([i["condition_frames"] for i in items])
    for key in items[0]:
        if key.startswith(("input_ids", "attention_mask")):
            out[key] = torch.stack([i[key] for i in items])
    return out


def token_keys(count: int) -> list[tuple[str, str]]:
    """The batch keys of the caption's tokens for ``count`` tokenizers: ``(input_ids, attention_mask)``,
    then ``(input_ids_2, attention_mask_2)``, ..."""
    return [("input_ids", "attention_mask")] + [(f"input_ids_{k}", f"attention_mask_{k}") for k in range(2, count + 1)]
