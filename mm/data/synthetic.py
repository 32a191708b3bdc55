"""A synthetic video dataset: coloured shapes moving over a background, with captions that say so.

Written as real H.264 .mp4 files (PyAV), an OpenSoraPlan-style annotation JSON and a ``data.txt``
line, exactly what a user's dataset looks like, so the tests and the quickstart exercise the real
reading path. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mm.data.video_writer import write_mp4

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (50, 80, 230), "yellow": (235, 210, 40),
           "white": (240, 240, 240), "purple": (150, 60, 200)}
SHAPES = ("square", "circle")
MOTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}


def render_clip(frames: int, height: int, width: int, shape: str, colour: str, background: str,
                motion: str) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8: a shape moving across a plain background."""
    size = max(4, min(height, width) // 4)
    dx, dy = MOTIONS[motion]
    yy, xx = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        frac = t / max(frames - 1, 1)
        cx = width / 2 + dx * (frac - 0.5) * (width - size)
        cy = height / 2 + dy * (frac - 0.5) * (height - size)
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (size / 2) ** 2
        else:
            mask = (abs(xx - cx) <= size / 2) & (abs(yy - cy) <= size / 2)
        video[t] = COLOURS[background]
        video[t][mask] = COLOURS[colour]
    return video


def caption(shape: str, colour: str, motion: str, background: str) -> str:
    """The caption of a clip, e.g. "a red square moving left to right on a white background"."""
    return f"a {colour} {shape} moving {motion} on a {background} background"


def _check_clip(spec: tuple[str, str, str, str]) -> None:
    if len(spec) != 4:
        raise ValueError(f"clip {spec!r}: expected (shape, colour, motion, background)")
    shape, colour, motion, background = spec
    for what, value, valid in (("shape", shape, SHAPES), ("colour", colour, COLOURS), ("motion", motion, MOTIONS),
                               ("background", background, COLOURS)):
        if value not in valid:
            raise ValueError(f"clip {spec!r}: {what} {value!r}; valid: {', '.join(valid)}")
    if colour == background:
        raise ValueError(f"clip {spec!r}: the shape's colour is the background's")


def colour_centroids(frames: np.ndarray, colour: str, tolerance: float = 90.0) -> list[tuple[float, float, int]]:
    """Where a shape of ``colour`` is in each frame of ``frames`` (``[T, H, W, 3]`` uint8): per frame
    ``(x, y, pixels)``, the centroid (in pixels, NaN when none) and the count of the pixels within
    ``tolerance`` (Euclidean RGB distance) of the colour."""
    target = np.asarray(COLOURS[colour], dtype=np.float32)
    near = np.linalg.norm(frames.astype(np.float32) - target, axis=-1) <= tolerance  # [T, H, W]
    out = []
    for mask in near:
        ys, xs = np.nonzero(mask)
        out.append((float(xs.mean()) if xs.size else float("nan"), float(ys.mean()) if ys.size else float("nan"),
                    int(xs.size)))
    return out


def make_dataset(root: str | Path, num_videos: int = 8, frames: int = 17, sizes: list[tuple[int, int]] | None = None,
                 fps: int = 16, seed: int = 0, clips: list[tuple[str, str, str, str]] | None = None) -> Path:
    """Write ``num_videos`` clips under ``root/videos``, ``root/annotation.json`` and ``root/data.txt``;
    returns the data.txt path. ``sizes`` cycles through (height, width) pairs (several aspect ratios).
    ``clips``: (shape, colour, motion, background) of clip ``i`` is ``clips[i % len(clips)]`` (default:
    drawn at random from ``seed``)."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = sizes or [(64, 64)]
    for spec in clips or []:
        _check_clip(spec)
    records = []
    for i in range(num_videos):
        height, width = sizes[i % len(sizes)]
        if clips:
            shape, colour, motion, background = clips[i % len(clips)]
        else:
            shape, colour, motion = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(MOTIONS))
            background = rng.choice([c for c in COLOURS if c != colour])
        name = f"videos/clip_{i:04d}.mp4"
        write_mp4(root / name, render_clip(frames, height, width, shape, colour, background, motion), fps)
        records.append({"path": name, "cap": caption(shape, colour, motion, background),
                        "num_frames": frames, "fps": fps, "resolution": {"height": height, "width": width},
                        "aesthetic": round(4.0 + rng.random() * 2, 2)})
    (root / "annotation.json").write_text(json.dumps(records, indent=1))
    data_txt = root / "data.txt"
    data_txt.write_text(f"{root},{root / 'annotation.json'}\n")
    return data_txt


@dataclass
class MotionReport:
    """Whether a video shows a ``colour`` shape moving as ``motion`` says (``follows_motion``)."""

    ok: bool
    text: str
    centroids: list[tuple[float, float, int]]


def follows_motion(frames: np.ndarray, colour: str, motion: str, tolerance: float = 90.0,
                   min_travel: float = 0.5) -> MotionReport:
    """Check ``frames`` (``[T, H, W, 3]`` uint8) against a caption's colour and motion, from the centroid
    of the pixels near the colour (``colour_centroids``) in each frame: every frame holds a shape-sized
    patch of the colour (at least a fifth of the clip's shape, at most a quarter of the frame), its
    centre travels from the first frame to the last along the motion by at least ``min_travel`` of what
    ``render_clip``'s shape travels, and moves across it by less than a quarter of the frame."""
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r}; valid: {', '.join(MOTIONS)}")
    _, height, width, _ = frames.shape
    dx, dy = MOTIONS[motion]
    size = max(4, min(height, width) // 4)
    centroids = colour_centroids(frames, colour, tolerance)
    pixels = [n for _, _, n in centroids]
    along, across = (0, 1) if dx else (1, 0)
    sign, extent = (dx, width) if dx else (dy, height)
    name = "xy"[along]
    problems = []
    if min(pixels) < size * size / 5 or max(pixels) > height * width / 4:
        problems.append(f"{colour} pixels per frame {min(pixels)}..{max(pixels)}, expected {size * size // 5}.."
                        f"{height * width // 4}")
    travel = (centroids[-1][along] - centroids[0][along]) * sign if min(pixels) else float("nan")
    wanted = min_travel * (extent - size)
    if not travel >= wanted:  # NaN fails too
        problems.append(f"travel {travel:.1f} px along {name}, expected >= {wanted:.1f}")
    drift = [c[across] for c in centroids if c[2]]
    if drift and max(drift) - min(drift) >= (width if across == 0 else height) / 4:
        problems.append(f"{'xy'[across]} drifts {max(drift) - min(drift):.1f} px")
    first, last = centroids[0][along], centroids[-1][along]
    text = (f"{colour} centre {name}: {first:.0f} -> {last:.0f} px over {len(centroids)} frames "
            f"({min(pixels)}..{max(pixels)} {colour} pixels per frame)")
    return MotionReport(ok=not problems, text=text + ("" if not problems else ": " + "; ".join(problems)),
                        centroids=centroids)
