"""Still images as video-shaped tensors: the first / last frames of image-to-video sampling."""

from __future__ import annotations

import numpy as np
import torch


def load_condition_frames(paths: list[str], height: int, width: int) -> torch.Tensor:
    """``[1, 3, len(paths), height, width]`` in [-1, 1]: the images, resized (Lanczos) to the video size."""
    from PIL import Image

    frames = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            frames.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return (torch.stack(frames, dim=1).float() / 127.5 - 1.0).unsqueeze(0)
