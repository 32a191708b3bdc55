"""Still images as video-shaped tensors: the first / last frames of image-to-video sampling."""

from __future__ import annotations

import numpy as np
import torch


def centre_box(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """The largest centred (left, top, right, bottom) box of an image of ``size`` (width, height) with the
    aspect ratio of ``width`` x ``height``."""
    w, h = size
    if w * height > h * width:  # wider than the target: keep the full height
        cw, ch = round(h * width / height), h
    else:
        cw, ch = w, round(w * height / width)
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def load_condition_frames(paths: list[str], height: int, width: int, crop: bool = False) -> torch.Tensor:
    """``[1, 3, len(paths), height, width]`` in [-1, 1]: the images, resized (Lanczos) to the video size;
    with ``crop`` first cut to the video's aspect ratio (``centre_box``) instead of stretched."""
    from PIL import Image

    frames = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if crop:
                image = image.crop(centre_box(image.size, height, width))
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            frames.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return (torch.stack(frames, dim=1).float() / 127.5 - 1.0).unsqueeze(0)
