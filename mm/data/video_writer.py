"""Writing videos: H.264 .mp4 through PyAV (a runtime dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_mp4(path: str | Path, video: np.ndarray, fps: int) -> None:
    """``video``: ``[frames, height, width, 3]`` uint8 RGB, as H.264 (yuv420p, so height and width
    should be even) in an .mp4 at ``fps``.

    A failed write raises OSError naming ``path`` (PyAV's own errors carry only the errno) and
    removes what was written of the file, so no truncated video is left under the name."""
    import av

    try:
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
    except OSError as e:
        try:
            if Path(path).is_file():
                Path(path).unlink()
        except OSError:
            pass
        if e.errno is None:
            raise OSError(f"{path}: {e}") from e
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
