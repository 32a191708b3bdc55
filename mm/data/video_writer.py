"""Writing videos: H.264 .mp4 through PyAV (a runtime dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_mp4(path: str | Path, video: np.ndarray, fps: int) -> None:
    """``video``: ``[frames, height, width, 3]`` uint8 RGB, as H.264 (yuv420p, so height and width
    should be even) in an .mp4 at ``fps``."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = video.shape[1], video.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
