"""Reading frames: decord's VideoReader where it is installed, else PyAV; images through PIL.

Both backends return ``[T, H, W, 3]`` uint8 RGB for the requested frame indices. A file that
cannot be read raises ``BadSample`` with the reason, so the dataset can skip and count it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

READERS = ("auto", "decord", "pyav")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of the counted categories."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float


def resolve_reader(name: str) -> str:
    """The backend for ``video_reader_type`` (``auto``: decord if installed, else PyAV)."""
    if name not in READERS:
        raise ValueError(f"dataset_param.preprocess_parameters.video_reader_type = {name!r}; valid: {', '.join(READERS)}")
    if name == "auto":
        return "decord" if importlib.util.find_spec("decord") is not None else "pyav"
    if name == "decord" and importlib.util.find_spec("decord") is None:
        raise ValueError("video_reader_type = 'decord' but decord is not installed (pip install mm[video]); use 'pyav'")
    return name


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise BadSample("missing", str(path))
    if path.stat().st_size == 0:
        raise BadSample("empty file", str(path))


class _Clip:
    """One open video or image: what it holds, and frames read through the same handle."""

    def __init__(self, path: Path, reader: str):
        self.path, self.reader = path, reader
        self._container = self._image = self._vr = None
        if is_image(path):
            from PIL import Image

            with Image.open(path) as img:
                self._image = np.asarray(img.convert("RGB"))
            self.info = VideoInfo(1, 1.0)
        elif reader == "decord":
            import decord

            self._vr = decord.VideoReader(str(path), num_threads=1)
            self.info = VideoInfo(len(self._vr), float(self._vr.get_avg_fps()))
        else:
            import av

            self._container = av.open(str(path))
            if not self._container.streams.video:
                raise BadSample("no frames", f"{path}: no video stream")
            stream = self._container.streams.video[0]
            # the container's frame count when it has one (mp4 does); counting by decoding is the fallback
            frames = stream.frames
            if not frames:
                frames = sum(1 for _ in self._container.decode(stream))
                self._container.seek(0)
            self.info = VideoInfo(frames, float(stream.average_rate or 0))
        if self.info.num_frames == 0:
            raise BadSample("no frames", str(path))

    def frames(self, indices: list[int]) -> np.ndarray:
        if not indices:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        if self._image is not None:
            return np.stack([self._image] * len(indices))
        if self._vr is not None:
            return self._vr.get_batch(indices).asnumpy()
        wanted, frames = set(indices), {}
        for i, frame in enumerate(self._container.decode(self._container.streams.video[0])):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
        missing = wanted - set(frames)
        if missing:
            raise BadSample("too short", f"{self.path}: frames {sorted(missing)[:3]}... not decodable")
        return np.stack([frames[i] for i in indices])

    def close(self) -> None:
        if self._container is not None:
            self._container.close()


def _read(path: Path, reader: str, choose: Callable[[VideoInfo], list[int]]) -> np.ndarray:
    clip = None
    try:
        clip = _Clip(path, reader)
        return clip.frames(choose(clip.info))
    finally:
        if clip is not None:
            clip.close()


def read_clip(path: str | Path, reader: str, choose: Callable[[VideoInfo], list[int]]) -> np.ndarray:
    """Open a video (or image) once, pick frame indices from what it holds, and read them as
    ``[T, H, W, 3]`` uint8. Any failure is a ``BadSample`` with its reason. A video decord cannot
    decode is read again with PyAV (decord 0.6 fails on some frame widths, e.g. 48 pixels, that
    FFmpeg decodes fine), so a file is only bad when neither can read it."""
    path = Path(path)
    _check_file(path)
    try:
        return _read(path, reader, choose)
    except BadSample:
        raise
    except Exception as e:  # decoders and PIL raise their own error types for corrupt data
        first = f"{type(e).__name__}: {e}"
    if reader == "decord" and not is_image(path):
        try:
            return _read(path, "pyav", choose)
        except BadSample:
            raise
        except Exception as e:
            first = f"decord: {first}; PyAV: {type(e).__name__}: {e}"
    raise BadSample("unreadable", f"{path}: {first}")


def probe(path: str | Path, reader: str) -> VideoInfo:
    """What a video (or image) holds, without decoding it."""
    found = []
    read_clip(path, reader, lambda info: found.append(info) or [])
    return found[0]


def read_frames(path: str | Path, indices: list[int], reader: str) -> np.ndarray:
    """Frames ``indices`` of a video (or the image, for index 0) as ``[T, H, W, 3]`` uint8."""
    return read_clip(path, reader, lambda info: indices)
