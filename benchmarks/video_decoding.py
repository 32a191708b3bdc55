"""Clips per second of the data pipeline (decode + sample frames + resize/crop + normalise) for
81-frame 480x832 clips, with decord and with PyAV, in one process (no loader workers).

    python benchmarks/video_decoding.py --clips 4 --repeats 2

Writes its own synthetic H.264 clips (832x480 source at 16 fps) to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mm.data import VideoDataConfig, VideoDataset, make_dataset, read_data_txt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frames", type=int, default=81)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data_txt = make_dataset(tmp, num_videos=args.clips, frames=args.frames, sizes=[(480, 832)], fps=16)
        samples, _ = read_data_txt(data_txt)
        print(f"{args.clips} clips of {args.frames} frames at 480x832, torch threads {torch.get_num_threads()}")
        for reader in ("decord", "pyav"):
            cfg = VideoDataConfig.from_json({"buckets": [[args.frames, 480, 832]], "video_reader_type": reader})
            ds = VideoDataset(samples, cfg)
            ds[0]  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                for i in range(len(ds)):
                    assert ds[i]["video"].shape == (3, args.frames, 480, 832)
            elapsed = time.perf_counter() - start
            print(f"{reader:<7} {args.repeats * len(ds) / elapsed:6.2f} clips/s ({elapsed / (args.repeats * len(ds)):.2f} s/clip)")


if __name__ == "__main__":
    main()
