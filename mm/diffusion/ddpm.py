"""OpenSoraPlan v1.3's training objective: a discrete-time DDPM noise schedule with eps- or
v-prediction and min-SNR loss weighting.

The schedule has ``N = num_train_steps`` levels: betas (linear, scaled-linear or the cosine
``squaredcos_cap_v2``), optionally rescaled to a zero terminal SNR (Lin et al. 2023, Algorithm 1),
``alphas_cumprod = cumprod(1 - betas)``. A clean latent ``x0`` at integer timestep ``t`` in [0, N) is
noised as ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; the DiT predicts ``noise`` (``epsilon``) or
``v = sqrt(a_t) noise - sqrt(1 - a_t) x0`` (``v_prediction``). With ``snr_gamma`` the squared error of
each sample is weighted by ``min(snr, gamma) / snr`` (epsilon) or ``min(snr, gamma) / (snr + 1)``
(v), ``snr = a_t / (1 - a_t)`` (Hang et al. 2023). A padding mask ``[b, t, h, w]`` over the latent grid
averages the loss over real positions only. Timesteps are drawn uniformly from [0, N), or, with
``explicit_uniform``, each data-parallel rank draws from its own 1/world slice of [0, N), so a global
batch covers the range evenly.

All of it follows the reference's use of diffusers' ``DDPMScheduler`` (betas in fp32, ``add_noise``
and ``get_velocity`` in the latent's dtype), without depending on diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
T_SAMPLE_METHODS = ("random", "explicit_uniform")


def _glide_cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last ``alphas_cumprod`` is exactly 0 (pure noise at t = N - 1) and whose first is
    unchanged: ``sqrt(alphas_cumprod)`` shifted and scaled linearly, then turned back into betas."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    cumprod = root ** 2
    alphas = torch.cat([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete schedule shared by training and the samplers (diffusers' defaults)."""

    num_train_steps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.num_train_steps < 2:
            raise ValueError(f"diffusion.num_train_steps = {self.num_train_steps}; valid: an integer >= 2")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"diffusion.beta_schedule = {self.beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"diffusion.beta_start = {self.beta_start}, beta_end = {self.beta_end}; "
                             "valid: 0 < beta_start <= beta_end < 1")

    def betas(self) -> torch.Tensor:
        n = self.num_train_steps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float32) ** 2
        else:
            betas = _glide_cosine_betas(n)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> torch.Tensor:
        """``[N]`` fp32 signal fractions ``a_t``; the last is 0 under ``rescale_betas_zero_snr``."""
        return torch.cumprod(1.0 - self.betas(), dim=0)


# keys of the model JSON's ``diffusion`` section that the reference's configs carry but that only
# another component reads: the sampler's spacing and guidance, and the device (layer 1 decides it)
_IGNORED_FOR_TRAINING = ("timestep_spacing", "guidance_scale", "device")


def split_json(section: dict[str, Any], owners: tuple[type, ...], ignored: tuple[str, ...] = (),
               where: str = "diffusion") -> list[dict[str, Any]]:
    """Split a flat JSON section into keyword arguments for each dataclass in ``owners`` (a key goes to
    the first that has it); unknown keys are a ValueError naming them and the valid ones."""
    names = [{f.name for f in fields(o)} - {"schedule"} for o in owners]
    parts: list[dict[str, Any]] = [{} for _ in owners]
    unknown = []
    for key, value in section.items():
        if key == "model_id" or key in ignored:
            continue
        if key == "num_train_timesteps":  # diffusers' name for num_train_steps
            key = "num_train_steps"
            if "num_train_steps" in section and section["num_train_steps"] != value:
                raise ValueError(f"{where}.num_train_timesteps = {value} and {where}.num_train_steps = "
                                 f"{section['num_train_steps']}: give one of them")
        for part, known in zip(parts, names):
            if key in known:
                part[key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(set().union(*names) | {"model_id", "num_train_timesteps", *ignored})
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
    return parts


@dataclass(frozen=True)
class DDPMConfig:
    """The objective's own keys (MindSpeed-MM's names); ``snr_gamma`` None means plain MSE."""

    schedule: NoiseSchedule = NoiseSchedule()
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    t_sample_method: str = "random"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"diffusion.prediction_type = {self.prediction_type!r}; valid: "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.t_sample_method not in T_SAMPLE_METHODS:
            raise ValueError(f"diffusion.t_sample_method = {self.t_sample_method!r}; valid: "
                             f"{', '.join(T_SAMPLE_METHODS)}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"diffusion.snr_gamma = {self.snr_gamma}; valid: a number > 0, or null for plain MSE")
        if self.noise_offset < 0:
            raise ValueError(f"diffusion.noise_offset = {self.noise_offset}; valid: >= 0")
        if self.snr_gamma is not None and self.prediction_type == "epsilon" and self.schedule.rescale_betas_zero_snr:
            # the weight min(snr, gamma) / snr is 0 / 0 at the last timestep, whose SNR is 0
            raise ValueError("diffusion.snr_gamma with prediction_type = 'epsilon' and rescale_betas_zero_snr = true: "
                             "the epsilon weight min(snr, gamma) / snr is undefined at zero SNR; use v_prediction")

    @classmethod
    def from_json(cls, section: dict[str, Any], where: str = "diffusion") -> "DDPMConfig":
        """From a model JSON's ``diffusion`` section (``model_id`` "DDPM")."""
        model_id = section.get("model_id", "DDPM")
        if model_id != "DDPM":
            raise ValueError(f"{where}.model_id = {model_id!r}; valid for training: DDPM")
        schedule, own = split_json(section, (NoiseSchedule, cls), _IGNORED_FOR_TRAINING, where)
        return cls(schedule=NoiseSchedule(**schedule), **own)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class DDPM:
    """Noise, timesteps, noisy latents, targets and the loss for a ``[b, c, t, h, w]`` latent."""

    def __init__(self, config: DDPMConfig):
        self.config = config
        self.num_train_steps = config.schedule.num_train_steps
        self.alphas_cumprod = config.schedule.alphas_cumprod()

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, rank: int = 0,
                         world_size: int = 1, device: torch.device | None = None) -> torch.Tensor:
        """``[batch]`` int64 timesteps in [0, N). ``explicit_uniform``: from slice ``rank`` of ``world_size``
        equal slices, each integer rounded from a uniform draw in ``[N rank / world - 0.5, N (rank + 1) /
        world - 0.5)``; pass the data-parallel rank and size (every rank of one replica the same)."""
        n = self.num_train_steps
        if self.config.t_sample_method == "random":
            t = torch.randint(0, n, (batch,), generator=generator)
        else:
            if not 0 <= rank < world_size:
                raise ValueError(f"explicit_uniform timesteps: rank {rank} of world_size {world_size}; "
                                 "valid: 0 <= rank < world_size")
            width = n / world_size
            u = torch.rand(batch, generator=generator, dtype=torch.float64)
            t = torch.round(width * rank - 0.5 + width * u).clamp(0, n - 1).long()
        return t.to(device)

    def sample_noise(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """fp32 Gaussian noise of ``shape`` ``[b, c, ...]``; with ``noise_offset`` plus ``noise_offset``
        times a second draw that is constant over each sample's channel (its brightness)."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if self.config.noise_offset:
            offset = torch.randn((shape[0], shape[1]), generator=generator, device=device, dtype=torch.float32)
            noise = noise + self.config.noise_offset * offset.reshape(shape[0], shape[1], *([1] * (len(shape) - 2)))
        return noise

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor):
        """``sqrt(a_t)`` and ``sqrt(1 - a_t)`` per sample, in ``like``'s dtype (as diffusers computes them)."""
        a = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
        return _per_sample(a ** 0.5, like), _per_sample((1 - a) ** 0.5, like)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        signal, sigma = self._coefficients(timesteps, x0)
        return signal * x0 + sigma * noise.to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the DiT is trained to output: ``noise``, or ``v = sqrt(a_t) noise - sqrt(1 - a_t) x0``."""
        if self.config.prediction_type == "epsilon":
            return noise.to(x0.dtype)
        signal, sigma = self._coefficients(timesteps, noise.to(x0.dtype))
        return signal * noise.to(x0.dtype) - sigma * x0

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """fp32 ``a_t / (1 - a_t)`` per timestep."""
        a = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return ((a ** 0.5) / ((1.0 - a) ** 0.5)).float() ** 2

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """``[b]`` min-SNR weights, or None without ``snr_gamma``."""
        gamma = self.config.snr_gamma
        if gamma is None:
            return None
        snr = self.snr(timesteps)
        clipped = torch.minimum(snr, torch.full_like(snr, gamma))
        return clipped / snr if self.config.prediction_type == "epsilon" else clipped / (snr + 1)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 scalar: the (min-SNR weighted) squared error, averaged over every element, or with
        ``mask`` ``[b, t, h, w]`` (1 = real latent, 0 = padding) summed over the real ones and divided
        by their number (times channels)."""
        return self.weighted_loss(prediction, target, self.loss_weights(timesteps), mask)

    def weighted_loss(self, prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """``loss`` with the per-sample weights ``[b]`` given (``loss_weights``' result, e.g. computed on
        another pipeline stage) instead of the timesteps."""
        b = prediction.shape[0]
        err = ((prediction.float() - target.float()) ** 2).reshape(b, -1)
        if weights is not None:
            err = err * weights.to(err.device).reshape(b, 1)
        if mask is None:
            return err.mean()
        if mask.shape != (b, *prediction.shape[2:]):
            raise ValueError(f"loss mask of shape {tuple(mask.shape)}; expected [b, t, h, w] = "
                             f"{[b, *prediction.shape[2:]]} for a prediction of shape {list(prediction.shape)}")
        m = mask.float().unsqueeze(1).expand(prediction.shape).reshape(b, -1)
        return (err * m).sum() / m.sum()
