"""Image conditioning of the Wan family for training, computed on pipeline stage 0.

Three recipes, chosen by ``WanConditioning.from_config(predictor config, dataset_type)``:

- ``i2v`` / ``flf2v`` (Wan2.1 I2V and FLF2V, Wan2.2 I2V-A14B; ``predictor.in_dim = 2 z + 4``): a
  video of ``num_frames`` zeros holding the condition frame(s) at their places (the first; FLF2V
  also the last) is VAE-encoded (the mean of the latent distribution, normalised) and prefixed
  with a 4-channel mask of the known frames: ``y [b, 4 + z, f, h, w]``, and the DiT reads
  ``cat([noisy_latents, y], dim=1)``. Models with ``predictor.image_dim`` (Wan2.1) also read the
  condition frames' CLIP tokens as ``context_image``. The loss covers every latent frame.
- ``ti2v`` (Wan2.2 TI2V-5B; ``predictor.in_dim = z``): the first latent frame of the noisy
  latents is replaced by the condition image's clean latent and its tokens get timestep 0. The
  DiT's prediction for that frame is not trained: its target (``noise - x0``) is not recoverable
  from a clean input, so the loss covers latent frames 1 onwards (``loss_frames``), as
  DiffSynth-Studio's Wan training does.
- ``none``: text-to-video (and text-to-image) training, the latents as they are.

The numbers match diffusers' ``WanImageToVideoPipeline.prepare_latents`` and ``encode_image``
(tests/unit/test_wan_conditioning.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

KINDS = ("none", "i2v", "flf2v", "ti2v")
MODES = ("first", "first_last")  # which condition frames: the first; the first and the last
# the data JSON's dataset_param.dataset_type values, by what a sample carries
TEXT_ONLY_DATASETS = ("t2v", "t2i", "image")
CONDITION_DATASETS = {"i2v": "first", "flf2v": "first_last"}


def _check_condition_frames(condition_frames: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"conditioning mode {mode!r}; valid: {', '.join(MODES)}")
    want = 1 if mode == "first" else 2
    if condition_frames.dim() != 5 or condition_frames.shape[2] != want:
        raise ValueError(f"condition_frames of shape {tuple(condition_frames.shape)}: mode {mode!r} expects "
                         f"[b, 3, {want}, H, W] (the dataset's {'first' if want == 1 else 'first and last'} "
                         "frame, in [-1, 1])")


def _vae_input(vae, frames: torch.Tensor) -> torch.Tensor:
    param = next(vae.parameters())
    return frames.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def i2v_condition(vae, condition_frames: torch.Tensor, num_frames: int, mode: str,
                  vae_cp: tuple | None = None) -> torch.Tensor:
    """The channel-concatenated condition ``y [b, t + z, f, h, w]`` of Wan I2V (``mode="first"``) and
    FLF2V (``"first_last"``), ``t`` = the VAE's temporal stride (4), ``f = 1 + (num_frames - 1) / t``.

    ``condition_frames [b, 3, 1 | 2, H, W]`` in [-1, 1] (the first frame; FLF2V: first, last) are
    placed in a zero video of ``num_frames`` frames, which ``vae`` encodes (over the VAE-CP group
    ``vae_cp`` when given); the latent mean is normalised with the VAE's per-channel statistics.
    Channels ``0..t-1`` mark which of the ``t`` video frames behind each latent frame are given (the
    first latent frame stands for the first video frame alone, so all ``t`` are set; FLF2V sets the
    last video frame, channel ``t-1`` of the last latent frame); channels ``t..`` are the latents.
    Returned in the VAE's dtype, on its device.
    """
    _check_condition_frames(condition_frames, mode)
    stride = vae.cfg.scale_factor_temporal
    if num_frames < 1 or (num_frames - 1) % stride:
        raise ValueError(f"num_frames = {num_frames}: the Wan VAE encodes 1 + {stride}k frames")
    if mode == "first_last" and num_frames == 1:
        raise ValueError(f"num_frames = 1: first-last-frame conditioning needs at least {1 + stride} frames")
    frames = _vae_input(vae, condition_frames)
    b, c, _, height, width = frames.shape
    video = frames.new_zeros(b, c, num_frames, height, width)
    video[:, :, 0] = frames[:, :, 0]
    if mode == "first_last":
        video[:, :, -1] = frames[:, :, 1]
    latents = vae.normalize(vae.encode(video, vae_cp=vae_cp)[0])
    mask = latents.new_zeros(b, stride, *latents.shape[2:])
    mask[:, :, 0] = 1
    if mode == "first_last":
        mask[:, -1, -1] = 1
    return torch.cat([mask, latents], dim=1)


@torch.no_grad()
def clip_context(image_encoder, condition_frames: torch.Tensor, mode: str) -> torch.Tensor:
    """``context_image [b, n * tokens, d]`` for the DiT's CLIP branch (Wan2.1 I2V: ``n = 1``; FLF2V:
    ``n = 2``, every first-frame token before every last-frame token, the order FLF2V's
    ``pos_embed`` is trained on). ``image_encoder`` is a ``ClipImageEncoder`` (it resizes and
    normalises the [-1, 1] frames itself); the result has its dtype and device."""
    _check_condition_frames(condition_frames, mode)
    b, n = condition_frames.shape[0], condition_frames.shape[2]
    images = condition_frames.transpose(1, 2).flatten(0, 1)  # [b * n, 3, H, W], sample-major
    tokens = image_encoder.encode(images)  # [b * n, tokens, d]
    return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])


@torch.no_grad()
def ti2v_image_latents(vae, condition_frames: torch.Tensor) -> torch.Tensor:
    """The condition image's normalised latent mean ``[b, z, 1, h, w]`` (Wan2.2 TI2V-5B), from
    ``condition_frames [b, 3, 1, H, W]`` in [-1, 1]. The VAE is causal and encodes the first video
    frame on its own, so for the dataset's first frame this equals the video's first latent frame."""
    _check_condition_frames(condition_frames, "first")
    return vae.normalize(vae.encode(_vae_input(vae, condition_frames))[0])


class TI2VInput(NamedTuple):
    latents: torch.Tensor  # [b, z, f, h, w]: the noisy latents, latent frame 0 the clean image latent
    timestep: torch.Tensor  # [b, s]: per token (frame, row, column order), 0 on latent frame 0


def ti2v_condition(noisy_latents: torch.Tensor, image_latents: torch.Tensor, timestep: torch.Tensor,
                   patch_size: tuple[int, int, int]) -> TI2VInput:
    """The DiT input of Wan2.2 TI2V-5B image-to-video training.

    ``noisy_latents [b, z, f, h, w]`` (``f >= 2``), ``image_latents [b, z, 1, h, w]`` from
    ``ti2v_image_latents``, ``timestep [b]`` (the noise level of each sample, in the scheduler's
    units), ``patch_size`` the DiT's ``(1, ph, pw)``. Latent frame 0 becomes the image latent (in the
    noisy latents' dtype); the timestep is ``s = f * (h / ph) * (w / pw)`` tokens long, 0 for the
    first ``(h / ph) * (w / pw)`` tokens and the sample's timestep elsewhere (in its dtype).
    The loss should leave latent frame 0 out (``WanConditioning.loss_frames``).
    """
    b, _, f, h, w = noisy_latents.shape
    pt, ph, pw = patch_size
    if pt != 1:
        raise ValueError(f"predictor.patch_size = {list(patch_size)}: first-frame conditioning needs a temporal "
                         "patch of 1 (one latent frame per token)")
    if h % ph or w % pw:
        raise ValueError(f"latent size {h}x{w} is not divisible by predictor.patch_size {list(patch_size)}")
    if f < 2:
        raise ValueError(f"{f} latent frame(s): first-frame conditioning needs at least 2 (num_frames >= 5), "
                         "one to condition on and one to learn")
    if image_latents.shape != (b, noisy_latents.shape[1], 1, h, w):
        raise ValueError(f"image_latents of shape {tuple(image_latents.shape)}; "
                         f"expected {(b, noisy_latents.shape[1], 1, h, w)}")
    if timestep.shape != (b,):
        raise ValueError(f"timestep of shape {tuple(timestep.shape)}; expected one per sample, ({b},)")
    latents = torch.cat([image_latents.to(noisy_latents.dtype), noisy_latents[:, :, 1:]], dim=2)
    per_frame = (h // ph) * (w // pw)
    per_token = timestep[:, None].repeat(1, f * per_frame)
    per_token[:, :per_frame] = 0
    return TI2VInput(latents, per_token)


def conditioning_kind(wan, dataset_type: str) -> str:
    """The conditioning ("none" | "i2v" | "flf2v" | "ti2v") of a ``WanDiTConfig`` trained on a data JSON's
    ``dataset_param.dataset_type``; a ValueError names the keys that do not fit together.

    ``predictor.in_dim == out_dim`` (the latents alone): text-only datasets train text-to-video;
    an ``i2v`` dataset trains first-frame conditioning in the latents (Wan2.2 TI2V-5B's recipe).
    ``predictor.in_dim == 2 * out_dim + 4`` (latents + mask + condition latents): ``i2v`` or
    ``flf2v`` datasets only; with the CLIP branch (``predictor.image_dim``), FLF2V needs
    ``predictor.pos_embed_seq_len`` and I2V must not have it.
    """
    types = (*TEXT_ONLY_DATASETS, *CONDITION_DATASETS)
    if dataset_type not in types:
        raise ValueError(f"dataset_param.dataset_type = {dataset_type!r}; valid: {', '.join(types)}")
    concat_dim = 2 * wan.out_dim + 4
    if wan.in_dim == wan.out_dim:
        if wan.image_dim is not None:
            raise ValueError(f"predictor.image_dim = {wan.image_dim} (a CLIP image branch) with predictor.in_dim = "
                             f"predictor.out_dim = {wan.in_dim} (no condition channels): Wan image conditioning "
                             f"with CLIP also needs predictor.in_dim = {concat_dim}")
        if dataset_type == "flf2v":
            raise ValueError(f"dataset_param.dataset_type = 'flf2v' needs a model with condition channels "
                             f"(predictor.in_dim = 2 * out_dim + 4 = {concat_dim}); this one has predictor.in_dim = "
                             f"{wan.in_dim}, which conditions on the first frame only (dataset_type 'i2v') or none "
                             f"({', '.join(TEXT_ONLY_DATASETS)})")
        return "ti2v" if dataset_type == "i2v" else "none"
    if wan.in_dim != concat_dim:
        raise ValueError(f"predictor.in_dim = {wan.in_dim} with predictor.out_dim = {wan.out_dim}: expected "
                         f"{wan.out_dim} (text-to-video, or TI2V first-frame conditioning) or {concat_dim} "
                         "(I2V/FLF2V: noisy latents + 4 mask channels + condition latents)")
    if dataset_type in TEXT_ONLY_DATASETS:
        raise ValueError(f"dataset_param.dataset_type = {dataset_type!r}, but predictor.in_dim = {wan.in_dim} "
                         f"(= 2 * out_dim + 4) is an image-to-video model that needs condition frames: use "
                         f"dataset_type 'i2v' or 'flf2v', or a text-to-video model (predictor.in_dim = {wan.out_dim})")
    if wan.image_dim is not None:
        if dataset_type == "flf2v" and wan.pos_embed_seq_len is None:
            raise ValueError("dataset_param.dataset_type = 'flf2v' with the CLIP branch (predictor.image_dim = "
                             f"{wan.image_dim}) needs predictor.pos_embed_seq_len (2 x the CLIP tokens: the FLF2V model)")
        if dataset_type == "i2v" and wan.pos_embed_seq_len is not None:
            raise ValueError(f"predictor.pos_embed_seq_len = {wan.pos_embed_seq_len} (an FLF2V model, first- and "
                             "last-frame CLIP tokens) with dataset_param.dataset_type = 'i2v' (first frame only): "
                             "use dataset_type 'flf2v'")
    return dataset_type


@dataclass(frozen=True)
class WanConditioning:
    """What the training loop does for one (model, dataset) pair; the same on every rank.

    Stage 0, per micro-batch: ``encode(vae, condition_frames, num_frames, vae_cp)`` (None for
    ``none``) and, when ``uses_clip``, ``encode_image(image_encoder, condition_frames)``; after
    noising, ``model_input(noisy_latents, timestep, condition)`` gives the DiT's latents and
    timestep. Last stage: the loss over ``prediction[:, :, loss_frames]``.
    """

    kind: str
    uses_clip: bool = False
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"conditioning kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.uses_clip and self.kind not in ("i2v", "flf2v"):
            raise ValueError(f"conditioning kind {self.kind!r} has no CLIP image context")

    @classmethod
    def from_config(cls, wan, dataset_type: str) -> "WanConditioning":
        kind = conditioning_kind(wan, dataset_type)
        return cls(kind, uses_clip=kind in ("i2v", "flf2v") and wan.image_dim is not None,
                   patch_size=tuple(wan.patch_size))

    @property
    def mode(self) -> str | None:
        """The condition frames the data carries: "first", "first_last" or None."""
        return {"i2v": "first", "flf2v": "first_last", "ti2v": "first"}.get(self.kind)

    @property
    def loss_frames(self) -> slice:
        """The latent frames (dim 2 of the prediction and the target) the loss covers."""
        return slice(1, None) if self.kind == "ti2v" else slice(None)

    def encode(self, vae, condition_frames: torch.Tensor | None, num_frames: int,
               vae_cp: tuple | None = None) -> torch.Tensor | None:
        """The per-sample condition: ``y`` (i2v/flf2v), the image latent (ti2v) or None.
        ``vae_cp`` is used for the ``num_frames``-long I2V/FLF2V condition video; the TI2V image is a
        single frame, one causal chunk that is not split."""
        if self.kind == "none":
            return None
        if condition_frames is None:
            raise ValueError(f"{self.kind} conditioning: the batch has no condition_frames")
        if self.kind == "ti2v":
            return ti2v_image_latents(vae, condition_frames)
        return i2v_condition(vae, condition_frames, num_frames, self.mode, vae_cp=vae_cp)

    def encode_image(self, image_encoder, condition_frames: torch.Tensor) -> torch.Tensor | None:
        """``context_image`` for the DiT's CLIP branch, or None when the model has none."""
        return clip_context(image_encoder, condition_frames, self.mode) if self.uses_clip else None

    def model_input(self, noisy_latents: torch.Tensor, timestep: torch.Tensor,
                    condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, timestep)`` for ``WanDiT.forward``: ``timestep [b]`` stays ``[b]`` except for
        ti2v (``[b, s]``); i2v/flf2v concatenate ``condition`` (``y``) after the latent channels."""
        if self.kind == "none":
            return noisy_latents, timestep
        if condition is None:
            raise ValueError(f"{self.kind} conditioning: no condition (WanConditioning.encode's result) given")
        if self.kind == "ti2v":
            return tuple(ti2v_condition(noisy_latents, condition, timestep, self.patch_size))
        if condition.shape[0] != noisy_latents.shape[0] or condition.shape[2:] != noisy_latents.shape[2:]:
            raise ValueError(f"condition y of shape {tuple(condition.shape)} does not fit latents of shape "
                             f"{tuple(noisy_latents.shape)} (same batch, frames, height, width)")
        return torch.cat([noisy_latents, condition.to(noisy_latents.dtype)], dim=1), timestep
