"""Reading frames: decord's VideoReader where it is installed, else PyAV; images through PIL.

Both backends return ``[T, H, W, 3]`` uint8 RGB for the requested frame indices. A file that
cannot be read raises ``BadSample`` with the reason, so the dataset can skip and count it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

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
    height: int
    width: int


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


def probe(path: str | Path, reader: str) -> VideoInfo:
    path = Path(path)
    _check_file(path)
    if is_image(path):
        from PIL import Image

        try:
            with Image.open(path) as img:
                return VideoInfo(1, 1.0, img.height, img.width)
        except Exception as e:  # PIL raises many types for broken files
            raise BadSample("unreadable", f"{path}: {e}") from None
    try:
        if reader == "decord":
            import decord

            vr = decord.VideoReader(str(path), num_threads=1)
            h, w = vr[0].shape[:2] if len(vr) else (0, 0)
            info = VideoInfo(len(vr), float(vr.get_avg_fps()), h, w)
        else:
            import av

            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise BadSample("no frames", f"{path}: no video stream")
                stream = container.streams.video[0]
                # the container's frame count when it has one (mp4 does); decoding to count is the fallback
                frames = stream.frames or sum(1 for _ in container.decode(stream))
                info = VideoInfo(frames, float(stream.average_rate or 0), stream.height, stream.width)
    except BadSample:
        raise
    except Exception as e:  # decoders raise their own error types for corrupt data
        raise BadSample("unreadable", f"{path}: {type(e).__name__}: {e}") from None
    if info.num_frames == 0:
        raise BadSample("no frames", str(path))
    return info


def read_frames(path: str | Path, indices: list[int], reader: str) -> np.ndarray:
    """Frames ``indices`` of a video (or the image, for index 0) as ``[T, H, W, 3]`` uint8."""
    path = Path(path)
    _check_file(path)
    try:
        if is_image(path):
            from PIL import Image

            with Image.open(path) as img:
                frame = np.asarray(img.convert("RGB"))
            return np.stack([frame] * len(indices))
        if reader == "decord":
            import decord

            vr = decord.VideoReader(str(path), num_threads=1)
            return vr.get_batch(indices).asnumpy()
        import av

        wanted = set(indices)
        frames = {}
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= max(indices):
                    break
        missing = wanted - set(frames)
        if missing:
            raise BadSample("too short", f"{path}: frames {sorted(missing)[:3]}... not decodable")
        return np.stack([frames[i] for i in indices])
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("unreadable", f"{path}: {type(e).__name__}: {e}") from None
