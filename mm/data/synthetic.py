"""A synthetic video dataset: coloured shapes moving over a background, with captions that say so.

Written as real H.264 .mp4 files (PyAV), an OpenSoraPlan-style annotation JSON and a ``data.txt``
line, exactly what a user's dataset looks like, so the tests and the quickstart exercise the real
reading path. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
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


def make_dataset(root: str | Path, num_videos: int = 8, frames: int = 17, sizes: list[tuple[int, int]] | None = None,
                 fps: int = 16, seed: int = 0) -> Path:
    """Write ``num_videos`` clips under ``root/videos``, ``root/annotation.json`` and ``root/data.txt``;
    returns the data.txt path. ``sizes`` cycles through (height, width) pairs (several aspect ratios)."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = sizes or [(64, 64)]
    records = []
    for i in range(num_videos):
        height, width = sizes[i % len(sizes)]
        shape, colour, motion = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(MOTIONS))
        background = rng.choice([c for c in COLOURS if c != colour])
        name = f"videos/clip_{i:04d}.mp4"
        write_mp4(root / name, render_clip(frames, height, width, shape, colour, background, motion), fps)
        records.append({"path": name, "cap": f"a {colour} {shape} moving {motion} on a {background} background",
                        "num_frames": frames, "fps": fps, "resolution": {"height": height, "width": width},
                        "aesthetic": round(4.0 + rng.random() * 2, 2)})
    (root / "annotation.json").write_text(json.dumps(records, indent=1))
    data_txt = root / "data.txt"
    data_txt.write_text(f"{root},{root / 'annotation.json'}\n")
    return data_txt
