"""Phantom subject-to-video (``task: s2v``) on a Wan2.1 text-to-video DiT.

Phantom-Wan is the Wan2.1 T2V architecture fine-tuned to read reference images of the subjects
as extra latent frames after the video's: each reference image is fitted inside the video frame
(aspect ratio kept, Lanczos, enlarged if smaller) and centred on a white canvas of the video's
size, VAE-encoded on its own as a one-frame video (the normalised latent mean), and the N
reference latents follow the video's latent frames on the time axis (their RoPE positions simply
continue the video's). Every step runs three DiT forwards on ``[video latents, references]`` and
keeps the video frames of each output:

- ``v_text``: the references and the prompt;
- ``v_image``: the references and the negative prompt;
- ``v_none``: zero latents in place of the references and the negative prompt;

guided as ``v_none + image_scale (v_image - v_none) + text_scale (v_text - v_image)``. The
references are clean on every step (same timestep as the video) and never denoised; the video
latents alone go through the sampler and the VAE decode.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_on_white(image, height: int, width: int):
    """``image`` (PIL) scaled to fit inside ``width`` x ``height`` with its aspect ratio (the longer
    relative side fills the frame), centred on a white canvas of exactly that size."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w / h > width / height:
        size = (width, int(width / (w / h)))
    else:
        size = (int(height * (w / h)), height)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(image.resize(size, Image.Resampling.LANCZOS), ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def load_reference_images(paths: list[str], height: int, width: int) -> torch.Tensor:
    """``[1, 3, N, height, width]`` in [-1, 1]: the reference images, fitted on white, in order."""
    from PIL import Image

    frames = []
    for path in paths:
        with Image.open(path) as image:
            frames.append(torch.from_numpy(np.asarray(fit_on_white(image, height, width)).copy()).permute(2, 0, 1))
    return (torch.stack(frames, dim=1).float() / 127.5 - 1.0).unsqueeze(0)


@torch.no_grad()
def reference_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """``[b, z, N, h, w]``: each of the N images of ``images [b, 3, N, H, W]`` encoded alone as a
    one-frame video (a causal VAE would otherwise compress them together), normalised latent mean;
    in the VAE's dtype, on its device."""
    param = next(vae.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    return torch.cat([vae.normalize(vae.encode(images[:, :, i:i + 1])[0]) for i in range(images.shape[2])], dim=2)
