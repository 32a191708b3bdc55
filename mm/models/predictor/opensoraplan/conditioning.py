"""The Open-Sora-Plan v1.3 inpainting condition (I2V and its relatives), for training and for sampling.

The I2V DiT (``videoditsparsei2v``) reads ``cat([noisy_latents, masked_video_latents, mask], dim=1)``:
``in_channels + in_channels + vae_scale_factor_t`` channels. A mask is per video frame: 1 where the
model generates the frame, 0 where the frame is given. The masked video keeps the given frames and
blacks out the rest (the reference zeroes 0..255 pixels, which is -1 in the VAE's [-1, 1] range); it
is VAE-encoded and normalised like the video latents. The mask is compressed onto the latent grid:
bilinear down-sampling by the VAE's spatial factor, then the first frame alone (repeated
``vae_scale_factor_t`` times) and the rest in groups of ``vae_scale_factor_t``, the group position
becoming the channel: ``mask [b, vae_scale_factor_t, f, h, w]``.

Training draws a mask per sample (``choose_mask``): a mask type by the configured ratios
(``mask_type_ratio_dict_video``; 1-frame samples use ``mask_type_ratio_dict_image``), then the frames
it keeps. With ``add_noise_to_condition`` the kept frames get Gaussian noise of a random strength.
Sampling gives the condition images at frame positions (one image: i2v at frame 0; two: transition,
first and last). Everything random comes from per-sample seeds, never from the global RNGs.

Reference: Open-Sora-Plan at 4b14d58, ``opensora/utils/mask_utils.py`` (mask types, generators,
``MaskProcessor``, ``MaskCompressor``, ``GaussianNoiseAdder``), ``opensora/dataset/inpaint_dataset.py``,
``opensora/train/train_inpaint.py``, ``opensora/sample/pipeline_inpaint.py`` and the v1.3 settings of
``scripts/train_configs/mask_config.yaml`` and ``scripts/text_condition/gpu/train_inpaint_v1_3.sh``.
The key names are MindSpeed-MM's (``dataset_param`` of its OpenSoraPlan 1.3 I2V data JSON).
Tests: tests/unit/test_opensoraplan_conditioning.py (the reference's own functions as the oracle).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

# the reference's MaskType, in its order (the order matters for nothing but messages)
MASK_TYPES = ("t2iv", "i2v", "transition", "continuation", "clear", "random_temporal")

# scripts/train_configs/mask_config.yaml, which train_inpaint_v1_3.sh trains with
V13_VIDEO_RATIOS = {"t2iv": 1, "i2v": 8, "transition": 8, "continuation": 2, "clear": 0, "random_temporal": 1}
V13_IMAGE_RATIOS = {"t2iv": 0, "clear": 0}  # all zero: the reference then picks uniformly

# GaussianNoiseAdder of train_inpaint.py: log-normal strength, and no noise for 5% of the samples
TRAIN_NOISE_LOG_MEAN, TRAIN_NOISE_LOG_STD, TRAIN_NOISE_CLEAR_RATIO = -3.0, 0.5, 0.05
# pipeline_inpaint.py: strength ``noise_strength`` (log-normal around it, std 0.01), always applied
SAMPLE_NOISE_LOG_STD = 0.01


def frame_mask(mask_type: str, num_frames: int, rng: random.Random, min_clear_ratio: float = 0.0,
               max_clear_ratio: float = 1.0) -> torch.Tensor:
    """The reference's mask generator ``mask_type`` as ``[num_frames]`` float32: 1 = generate, 0 = given.

    ``t2iv``: nothing given; ``clear``: everything; ``i2v``: frame 0; ``transition``: the first and the
    last; ``continuation``: the first ``randint(floor(T min), ceil(T max))`` frames; ``random_temporal``:
    that many frames ``rng.sample``d from all. The draws are the reference's, in its order, on ``rng``.
    """
    mask = torch.ones(num_frames)
    if mask_type == "t2iv":
        return mask
    if mask_type == "clear":
        return mask.zero_()
    if mask_type in ("i2v", "transition"):
        mask[0] = 0
        if mask_type == "transition":
            mask[-1] = 0
        return mask
    if mask_type not in ("continuation", "random_temporal"):
        raise ValueError(f"mask type {mask_type!r}; valid: {', '.join(MASK_TYPES)}")
    count = rng.randint(math.floor(num_frames * min_clear_ratio), math.ceil(num_frames * max_clear_ratio))
    if mask_type == "continuation":
        mask[:count] = 0
    else:
        mask[rng.sample(range(num_frames), count)] = 0
    return mask


def _normalized(ratios: dict[str, float]) -> dict[str, float]:
    """inpaint_dataset.py's type_ratio_normalize: shares of the total; all zero -> uniform."""
    total = sum(ratios.values())
    if total == 0:
        return {k: 1.0 / len(ratios) for k in ratios}
    return {k: v / total for k, v in ratios.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MaskConfig:
    """How training masks are drawn; the reference's v1.3 settings by default.

    ``mask_type_ratio_dict_video`` / ``_image``: relative weights of the mask types for videos and for
    1-frame samples (normalised; all zero means uniform over the listed types). ``min_clear_ratio``,
    ``max_clear_ratio``: the range of the share of frames ``continuation`` and ``random_temporal`` keep.
    ``add_noise_to_condition``: noise on the kept frames (train_inpaint_v1_3.sh sets it).
    ``where`` is the JSON section the keys came from, for messages.
    """

    mask_type_ratio_dict_video: dict[str, float] = field(default_factory=lambda: dict(V13_VIDEO_RATIOS))
    mask_type_ratio_dict_image: dict[str, float] = field(default_factory=lambda: dict(V13_IMAGE_RATIOS))
    min_clear_ratio: float = 0.0
    max_clear_ratio: float = 1.0
    add_noise_to_condition: bool = True
    where: str = field(default="dataset_param", compare=False)

    def __post_init__(self) -> None:
        problems = []
        for key in ("mask_type_ratio_dict_video", "mask_type_ratio_dict_image"):
            ratios = getattr(self, key)
            if not isinstance(ratios, dict) or not ratios:
                problems.append(f"{self.key(key)} = {ratios!r}; valid: an object of mask type -> weight >= 0, "
                                f"mask types {', '.join(MASK_TYPES)}")
                continue
            for name, weight in ratios.items():
                if name not in MASK_TYPES:
                    problems.append(f"{self.key(key)}.{name}: unknown mask type; valid: {', '.join(MASK_TYPES)}")
                elif not _is_number(weight) or weight < 0:
                    problems.append(f"{self.key(key)}.{name} = {weight!r}; valid: a number >= 0")
        for key in ("min_clear_ratio", "max_clear_ratio"):
            value = getattr(self, key)
            if not _is_number(value) or not 0 <= value <= 1:
                problems.append(f"{self.key(key)} = {value!r}; valid: a number in [0, 1]")
        if not problems and self.min_clear_ratio > self.max_clear_ratio:
            problems.append(f"{self.key('min_clear_ratio')} = {self.min_clear_ratio} > {self.key('max_clear_ratio')} "
                            f"= {self.max_clear_ratio}; valid: min_clear_ratio <= max_clear_ratio")
        if not isinstance(self.add_noise_to_condition, bool):
            problems.append(f"{self.key('add_noise_to_condition')} = {self.add_noise_to_condition!r}; "
                            "valid: true or false")
        if problems:
            raise ValueError("; ".join(problems))

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    @classmethod
    def from_json(cls, params: dict[str, Any], where: str = "dataset_param") -> "MaskConfig":
        """From the JSON keys (``KEYS``; absent ones keep their v1.3 defaults); unknown keys are an error."""
        unknown = sorted(set(params) - set(KEYS))
        if unknown:
            raise ValueError(f"{', '.join(f'{where}.{k}' for k in unknown)}: not mask settings; "
                             f"valid: {', '.join(KEYS)}")
        return cls(**params, where=where)

    def ratios(self, num_frames: int) -> dict[str, float]:
        """The normalised weights a ``num_frames``-frame sample draws its mask type from."""
        return _normalized(self.mask_type_ratio_dict_image if num_frames == 1 else self.mask_type_ratio_dict_video)


KEYS = tuple(f.name for f in dataclasses.fields(MaskConfig) if f.name != "where")


def choose_mask(num_frames: int, cfg: MaskConfig, rng: random.Random) -> tuple[str, torch.Tensor]:
    """One training sample's ``(mask type, frame mask [num_frames])``, as the reference's
    ``MaskProcessor(mask_type_ratio_dict=cfg.ratios(num_frames))`` draws it: ``rng.choices`` over the
    normalised ratios, then the type's own draws, all on ``rng``."""
    ratios = cfg.ratios(num_frames)
    mask_type = rng.choices(list(ratios), list(ratios.values()))[0]
    return mask_type, frame_mask(mask_type, num_frames, rng, cfg.min_clear_ratio, cfg.max_clear_ratio)


def _check_frames(num_frames: int, stride_t: int) -> int:
    if num_frames < 1 or (num_frames - 1) % stride_t:
        raise ValueError(f"{num_frames} frames: the VAE encodes 1 + {stride_t}k frames "
                         f"(vae_scale_factor_t = {stride_t})")
    return 1 + (num_frames - 1) // stride_t


def compress_mask(frame_masks: torch.Tensor, height: int, width: int, stride_t: int = 4,
                  stride_s: int = 8) -> torch.Tensor:
    """The reference's ``MaskCompressor`` of per-frame masks: ``frame_masks [b, T]`` (0/1, ``T = 1 +
    stride_t k``) of ``height x width`` frames -> ``[b, stride_t, 1 + k, height // stride_s,
    width // stride_s]`` in ``frame_masks``' dtype. Channel ``c`` of latent frame ``i >= 1`` is video
    frame ``1 + (i - 1) stride_t + c``; every channel of latent frame 0 is video frame 0.

    The reference resizes the full ``[T, H, W]`` mask (bilinear, align_corners False, in the mask's
    dtype); a frame is all 0 or all 1, so it becomes 0 or the resized plane of ones, computed once."""
    b, frames = frame_masks.shape
    f = _check_frames(frames, stride_t)
    plane = F.interpolate(frame_masks.new_ones(1, 1, height, width), size=(height // stride_s, width // stride_s),
                          mode="bilinear")[0, 0]
    grouped = torch.cat([frame_masks[:, :1].expand(b, stride_t), frame_masks[:, 1:]], dim=1)  # [b, stride_t f]
    return grouped.view(b, f, stride_t).transpose(1, 2)[..., None, None] * plane


def masked_video(video: torch.Tensor, frame_masks: torch.Tensor) -> torch.Tensor:
    """``video [b, 3, T, H, W]`` in [-1, 1] with the frames to generate (``frame_masks [b, T]`` >= 0.5)
    set to -1, the reference's ``pixels * (mask < 0.5)`` on 0..255 pixels."""
    keep = (frame_masks < 0.5)[:, None, :, None, None]
    return torch.where(keep, video, torch.full((), -1.0, dtype=video.dtype, device=video.device))


def _add_noise(masked: torch.Tensor, keep: torch.Tensor, log_mean: float, log_std: float,
               generator: torch.Generator) -> torch.Tensor:
    """GaussianNoiseAdder.add_noise: per sample ``sigma = exp(N(log_mean, log_std))``, ``sigma * randn``
    added where ``keep``; ``masked [b, ...]``, ``keep`` broadcastable to it."""
    sigma = torch.normal(log_mean, log_std, size=(masked.shape[0],), generator=generator, device=masked.device)
    noise = torch.randn(masked.shape, generator=generator, dtype=masked.dtype, device=masked.device)
    noise = noise * sigma.exp().to(masked.dtype).view(-1, *[1] * (masked.dim() - 1))
    return masked + torch.where(keep, noise, torch.zeros_like(noise))


def _vae_input(vae, x: torch.Tensor) -> torch.Tensor:
    param = next(vae.parameters())
    return x.to(device=param.device, dtype=param.dtype)


def _encode(vae, video: torch.Tensor, generators: Sequence[torch.Generator] | None, vae_cp) -> torch.Tensor:
    """Normalised latents of ``video``: the posterior mean, or a draw per sample with ``generators``
    (the reference wrapper's ``sample()``)."""
    mean, logvar = vae.encode(video, vae_cp=vae_cp)
    if generators is not None:
        mean = torch.cat([vae.sample(mean[i:i + 1], logvar[i:i + 1], g) for i, g in enumerate(generators)])
    return vae.normalize(mean)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class TrainingCondition(NamedTuple):
    condition: torch.Tensor  # [b, z + t, f, h, w]: masked-video latents, then the compressed mask
    mask_types: list[str]  # the mask type drawn for each sample


@torch.no_grad()
def training_condition(vae, video: torch.Tensor, seeds: Sequence[int], cfg: MaskConfig,
                       vae_cp: tuple | None = None, sample_posterior: bool = False) -> TrainingCondition:
    """The training condition of ``video [b, 3, T, H, W]`` in [-1, 1] (``T = 1 + 4k``; H, W multiples of
    the VAE's spatial factor): per sample ``i``, ``random.Random(seeds[i])`` draws the mask (and the
    noise's 5% skip) and ``torch.Generator(video.device).manual_seed(seeds[i])`` the noise (and the
    posterior draw when ``sample_posterior``).

    Returns ``condition = cat([masked-video latents, compress_mask(...)], 1)``, ``[b, z + t, 1 + k,
    H / s, W / s]`` (z the VAE's latent channels, t and s its temporal and spatial factors) in the
    VAE's dtype, and the mask type of each sample. The masked video is encoded like the video latents:
    the posterior mean (mm's video latents), or a draw (the reference) with ``sample_posterior``.
    """
    video = _vae_input(vae, video)
    b, _, frames, height, width = video.shape
    stride_t, stride_s = vae.cfg.scale_factor_temporal, vae.cfg.scale_factor_spatial
    _check_frames(frames, stride_t)
    if height % stride_s or width % stride_s:
        raise ValueError(f"frames of {height}x{width}: height and width must be multiples of the VAE's {stride_s}")
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for a batch of {b} videos; give one seed per sample")
    rngs = [random.Random(seed) for seed in seeds]
    gens = [_generator(seed, video.device) for seed in seeds]
    chosen = [choose_mask(frames, cfg, rng) for rng in rngs]
    frame_masks = torch.stack([m for _, m in chosen]).to(device=video.device, dtype=video.dtype)
    masked = masked_video(video, frame_masks)
    if cfg.add_noise_to_condition:
        keep = (frame_masks < 0.5)[:, None, :, None, None]
        masked = torch.cat([
            masked[i:i + 1] if rngs[i].random() < TRAIN_NOISE_CLEAR_RATIO else
            _add_noise(masked[i:i + 1], keep[i:i + 1], TRAIN_NOISE_LOG_MEAN, TRAIN_NOISE_LOG_STD, gens[i])
            for i in range(b)])
    latents = _encode(vae, masked, gens if sample_posterior else None, vae_cp)
    mask = compress_mask(frame_masks, height, width, stride_t, stride_s)
    return TrainingCondition(torch.cat([latents, mask.to(latents.dtype)], dim=1), [t for t, _ in chosen])


def default_indices(num_images: int) -> list[int]:
    """pipeline_inpaint.py's positions without explicit ones: one image i2v at frame 0, two transition."""
    if num_images == 1:
        return [0]
    if num_images == 2:
        return [0, -1]
    raise ValueError(f"{num_images} condition images: give their frame positions (indices), one per image")


@torch.no_grad()
def sampling_condition(vae, images: torch.Tensor, num_frames: int, indices: Sequence[int] | None = None,
                       noise_strength: float = 0.0, generator: torch.Generator | None = None,
                       vae_cp: tuple | None = None, sample_posterior: bool = False) -> torch.Tensor:
    """The condition pipeline_inpaint.py builds from condition images at frame positions.

    ``images [b, 3, n, H, W]`` in [-1, 1], already at the output size (the reference center-crops and
    resizes them first); ``indices`` their frames in the ``num_frames``-frame video (negative counts
    from the end; default ``default_indices(n)``). The video holds the images at their frames and -1
    elsewhere, the mask 0 at those frames. ``noise_strength > 0`` adds the pipeline's noise to the
    given frames (strength ``exp(N(log noise_strength, 0.01))`` per sample); it and the posterior draw
    of ``sample_posterior`` use ``generator`` (on the VAE's device). Returns ``[b, z + t, f, H / s,
    W / s]`` in the VAE's dtype, like ``training_condition``; classifier-free guidance repeats it.
    """
    images = _vae_input(vae, images)
    if images.dim() != 5 or images.shape[1] != 3:
        raise ValueError(f"condition images of shape {tuple(images.shape)}; expected [b, 3, n, H, W] in [-1, 1]")
    b, _, n, height, width = images.shape
    stride_t, stride_s = vae.cfg.scale_factor_temporal, vae.cfg.scale_factor_spatial
    _check_frames(num_frames, stride_t)
    if height % stride_s or width % stride_s:
        raise ValueError(f"images of {height}x{width}: height and width must be multiples of the VAE's {stride_s}")
    indices = default_indices(n) if indices is None else list(indices)
    if len(indices) != n:
        raise ValueError(f"indices = {indices}: {len(indices)} positions for {n} condition images; one per image")
    frames = []
    for i in indices:
        if not isinstance(i, int) or not -num_frames <= i < num_frames:
            raise ValueError(f"indices = {indices}: {i!r} is not a frame of a {num_frames}-frame video")
        frames.append(i % num_frames)
    if len(set(frames)) != n:
        raise ValueError(f"indices = {indices}: frames {frames} repeat; each image needs its own frame")
    if not _is_number(noise_strength) or not 0 <= noise_strength <= 1:
        raise ValueError(f"noise_strength = {noise_strength!r}; valid: a number in [0, 1]")
    if (noise_strength > 0 or sample_posterior) and generator is None:
        raise ValueError("noise_strength > 0 and sample_posterior draw random numbers: pass a generator")
    frame_masks = torch.ones(b, num_frames, dtype=images.dtype, device=images.device)
    frame_masks[:, frames] = 0
    video = images.new_full((b, 3, num_frames, height, width), -1.0)
    video[:, :, frames] = images
    if noise_strength > 0:
        keep = (frame_masks < 0.5)[:, None, :, None, None]
        video = _add_noise(video, keep, math.log(noise_strength), SAMPLE_NOISE_LOG_STD, generator)
    latents = _encode(vae, video, [generator] * b if sample_posterior else None, vae_cp)
    mask = compress_mask(frame_masks, height, width, stride_t, stride_s)
    return torch.cat([latents, mask.to(latents.dtype)], dim=1)


@dataclass(frozen=True)
class OpenSoraPlanConditioning:
    """What the training loop and the sampler do for the Open-Sora-Plan I2V DiT; the counterpart of
    ``WanConditioning`` (``uses_clip``, ``loss_frames``, ``model_input`` alike).

    Stage 0, per micro-batch: ``encode(vae, video, seeds, vae_cp)`` -> the condition; sampling:
    ``encode_images(vae, images, num_frames, indices)``; each DiT call:
    ``model_input(noisy_latents, timestep, condition)``. The loss covers every latent frame (the
    reference's).
    """

    masks: MaskConfig = field(default_factory=MaskConfig)
    in_channels: int = 8
    vae_scale_factor_t: int = 4

    kind = "inpaint"
    uses_clip = False
    loss_frames = slice(None)

    @classmethod
    def from_config(cls, predictor, params: dict[str, Any] | None = None,
                    where: str = "dataset_param") -> "OpenSoraPlanConditioning":
        """From an ``OpenSoraPlanDiTConfig`` (it must be the I2V one, ``vae_scale_factor_t`` set) and the
        mask keys (``KEYS``) of the JSON section ``where``."""
        if predictor.vae_scale_factor_t is None:
            raise ValueError(f"predictor.model_id = {predictor.model_id()!r} has no condition channels: inpainting / "
                             "I2V needs 'videoditsparsei2v' (predictor.vae_scale_factor_t, e.g. 4)")
        return cls(MaskConfig.from_json(params or {}, where), predictor.in_channels, predictor.vae_scale_factor_t)

    def _check_vae(self, vae) -> None:
        if vae.cfg.latent_dim != self.in_channels or vae.cfg.scale_factor_temporal != self.vae_scale_factor_t:
            raise ValueError(f"ae latent_dim = {vae.cfg.latent_dim} with temporal factor "
                             f"{vae.cfg.scale_factor_temporal}; the DiT expects predictor.in_channels = {self.in_channels} and "
                             f"predictor.vae_scale_factor_t = {self.vae_scale_factor_t}")

    def encode(self, vae, video: torch.Tensor, seeds: Sequence[int], vae_cp: tuple | None = None,
               sample_posterior: bool = False) -> torch.Tensor:
        """``training_condition(...).condition``: ``[b, in_channels + vae_scale_factor_t, f, h, w]``."""
        self._check_vae(vae)
        return training_condition(vae, video, seeds, self.masks, vae_cp, sample_posterior).condition

    def encode_images(self, vae, images: torch.Tensor, num_frames: int, indices: Sequence[int] | None = None,
                      noise_strength: float = 0.0, generator: torch.Generator | None = None,
                      vae_cp: tuple | None = None) -> torch.Tensor:
        """``sampling_condition(...)``: the same layout as ``encode``."""
        self._check_vae(vae)
        return sampling_condition(vae, images, num_frames, indices, noise_strength, generator, vae_cp)

    def model_input(self, noisy_latents: torch.Tensor, timestep: torch.Tensor,
                    condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cat([noisy_latents, condition], 1), timestep)``: ``[b, 2 in_channels + vae_scale_factor_t,
        f, h, w]`` in the noisy latents' dtype, for ``OpenSoraPlanDiT.forward``."""
        want = (noisy_latents.shape[0], self.in_channels + self.vae_scale_factor_t, *noisy_latents.shape[2:])
        if noisy_latents.shape[1] != self.in_channels or condition is None or tuple(condition.shape) != want:
            raise ValueError(f"noisy latents {tuple(noisy_latents.shape)} and condition "
                             f"{None if condition is None else tuple(condition.shape)}: expected [b, "
                             f"{self.in_channels}, f, h, w] and {list(want)} (masked-video latents, then the mask)")
        return torch.cat([noisy_latents, condition.to(noisy_latents.dtype)], dim=1), timestep
