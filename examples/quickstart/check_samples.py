"""Look at the quickstart's samples: for each prompt of inference_model.json, its newest .mp4 under the
samples directory, decoded; where the shape of the prompt's colour is in each frame (the centroid of
the pixels near that colour, ``mm.data.synthetic.follows_motion``) and whether it moves as the prompt
says; and a PNG strip of the frames side by side beside the video (``<video>_strip.png``).

    python examples/quickstart/check_samples.py outputs/quickstart           # prints, writes the strips
    python examples/quickstart/check_samples.py outputs/quickstart --strict  # exit status 1 unless all follow

The tests import ``check_samples`` from here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mm.data.decoding import read_clip
from mm.data.synthetic import COLOURS, MOTIONS, MotionReport, follows_motion


@dataclass
class SampleCheck:
    prompt: str
    video: Path
    report: MotionReport
    strip: Path | None


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, motion) of a synthetic caption ("a red square moving left to right on ...")."""
    words = prompt.split()
    colour = next((w for w in words if w in COLOURS), None)
    motion = next((m for m in MOTIONS if f"moving {m}" in prompt), None)
    shape = next((w for w in words if w in ("square", "circle")), None)
    if colour is None or motion is None or shape is None:
        raise ValueError(f"prompt {prompt!r} does not name a colour, a shape and a motion of the synthetic data")
    return colour, shape, motion


def decode(video: str | Path) -> np.ndarray:
    """Every frame of ``video``, ``[T, H, W, 3]`` uint8."""
    return read_clip(video, "auto", lambda info: list(range(info.num_frames)))


def write_strip(frames: np.ndarray, path: str | Path, gap: int = 2) -> Path:
    """The frames side by side (a ``gap``-pixel grey line between them) as a PNG."""
    from PIL import Image

    t, h, w, _ = frames.shape
    strip = np.full((h, t * w + (t - 1) * gap, 3), 128, dtype=np.uint8)
    for i, frame in enumerate(frames):
        strip[:, i * (w + gap): i * (w + gap) + w] = frame
    Image.fromarray(strip).save(path)
    return Path(path)


def newest_sample(samples: Path, prompt: str) -> Path | None:
    """The newest ``<prompt words>_seed<N>[_k].mp4`` (inference.py's names; N: the seed, plus the prompt's
    place with several prompts)."""
    from mm.inference.runner import sample_stem

    words = sample_stem(prompt, 0)[: -len("_seed0")]
    found = [p for p in samples.glob(f"{words}_seed*.mp4") if p.stem[len(words) + 5:].replace("_", "").isdigit()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def check_samples(out: str | Path, strips: bool = True) -> list[SampleCheck]:
    """Check the newest sample of each prompt of ``<out>/inference_model.json``."""
    inference = json.loads((Path(out) / "inference_model.json").read_text())["inference"]
    samples = Path(inference["save_path"])
    checks = []
    for prompt in inference["prompt"]:
        video = newest_sample(samples, prompt)
        if video is None:
            raise FileNotFoundError(f"no sample of {prompt!r} under {samples}")
        frames = decode(video)
        colour, _, motion = parse_prompt(prompt)
        strip = write_strip(frames, video.with_name(video.stem + "_strip.png")) if strips else None
        checks.append(SampleCheck(prompt, video, follows_motion(frames, colour, motion), strip))
    return checks


def main(argv: list[str]) -> int:
    strict = "--strict" in argv
    args = [a for a in argv if a != "--strict"]
    out = args[0] if args else "outputs/quickstart"
    checks = check_samples(out)
    for c in checks:
        verdict = "follows the prompt" if c.report.ok else "does NOT follow the prompt"
        print(f"quickstart: \"{c.prompt}\": {c.report.text}: {verdict}; frames: {c.strip}")
    return 1 if strict and not all(c.report.ok for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
