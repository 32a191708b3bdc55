"""Samplers on the discrete DDPM schedule of ``mm.diffusion.ddpm``: what OpenSoraPlan v1.3's inference
offers (``sample_method``; the inference JSON's ``diffusion.model_id``), computed as diffusers'
schedulers compute them, without depending on diffusers.

* ``EulerAncestralDiscrete`` (v1.3's choice): the schedule as noise levels ``sigma_t = sqrt((1 - a_t) /
  a_t)`` (Karras et al. 2022's parametrisation ``x = x0 + sigma noise``), interpolated at the inference
  timesteps, then 0. Each step: ``x0`` from the model output, an Euler step to ``sigma_down`` and fresh
  noise of std ``sigma_up`` (``sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2``,
  ``sigma_down^2 = sigma_next^2 - sigma_up^2``). Under ``rescale_betas_zero_snr`` the last ``a_t`` is
  2^-24 instead of 0, so the first sigma is finite (4096).
* ``EulerDiscrete``: the same levels, deterministic Euler steps to the next sigma.
* ``DDIM``: Song et al. 2021 (``eta`` 0 is deterministic); the previous timestep is ``t - N // steps``
  whatever the spacing, and before timestep 0 comes ``a = 1`` (``set_alpha_to_one``).
* ``DDPM``: ancestral sampling with the posterior variance ("fixed_small"), stepping between the
  inference timesteps.

Inference timesteps (``timestep_spacing``): ``linspace`` evenly over [0, N - 1]; ``leading`` ``k * (N //
steps) + steps_offset``; ``trailing`` ``round(N - k N / steps) - 1`` (starts at N - 1: the one to pair
with a zero terminal SNR). The Euler samplers give the DiT float timesteps, DDIM and DDPM integers. The
model input of the Euler samplers is scaled by ``1 / sqrt(sigma^2 + 1)`` (``scale_model_input``) and
their initial noise has std ``init_noise_sigma``. Updates are computed in fp32 and returned in the
sample's dtype; fresh noise is drawn in the model output's dtype from ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mm.diffusion.ddpm import PREDICTION_TYPES, NoiseSchedule, split_json

SAMPLE_METHODS = ("EulerAncestralDiscrete", "EulerDiscrete", "DDIM", "DDPM")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
# what the reference's sample_method also names, but this codebase does not implement
_NOT_IMPLEMENTED = ("PNDM", "DPMSolverMultistep", "DPMSolverSinglestep", "HeunDiscrete", "DEISMultistep",
                    "KDPM2AncestralDiscrete", "CogVideoX", "FlowMatchEulerDiscrete")


@dataclass(frozen=True)
class DDPMSamplerConfig:
    """The inference JSON's ``diffusion`` section. ``timestep_spacing`` None: ``trailing`` with
    ``rescale_betas_zero_snr``, else ``leading`` (as the reference sets it)."""

    schedule: NoiseSchedule = NoiseSchedule()
    model_id: str = "EulerAncestralDiscrete"
    num_inference_steps: int = 50
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0  # DDIM only
    clip_sample: bool = False  # DDIM, DDPM: clamp the predicted x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # DDIM: a = 1 before timestep 0 (else a_0)

    def __post_init__(self) -> None:
        if self.model_id not in SAMPLE_METHODS:
            extra = " (the reference also has it; not implemented here)" if self.model_id in _NOT_IMPLEMENTED else ""
            raise ValueError(f"diffusion.model_id = {self.model_id!r}{extra}; valid: {', '.join(SAMPLE_METHODS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"diffusion.prediction_type = {self.prediction_type!r}; valid: "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"diffusion.timestep_spacing = {self.timestep_spacing!r}; valid: "
                             f"{', '.join(TIMESTEP_SPACINGS)}")
        if not 1 <= self.num_inference_steps <= self.schedule.num_train_steps:
            raise ValueError(f"diffusion.num_inference_steps = {self.num_inference_steps}; valid: 1 .. "
                             f"num_train_steps ({self.schedule.num_train_steps})")
        if self.guidance_scale < 0:
            raise ValueError(f"diffusion.guidance_scale = {self.guidance_scale}; valid: >= 0 (> 1 turns on "
                             "classifier-free guidance)")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"diffusion.guidance_rescale = {self.guidance_rescale}; valid: 0 .. 1")
        if self.eta < 0:
            raise ValueError(f"diffusion.eta = {self.eta}; valid: >= 0")
        if self.steps_offset < 0:
            raise ValueError(f"diffusion.steps_offset = {self.steps_offset}; valid: >= 0")

    @property
    def spacing(self) -> str:
        if self.timestep_spacing is not None:
            return self.timestep_spacing
        return "trailing" if self.schedule.rescale_betas_zero_snr else "leading"

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @classmethod
    def from_json(cls, section: dict[str, Any], where: str = "diffusion") -> "DDPMSamplerConfig":
        """From an inference JSON's ``diffusion`` section (``device`` is accepted and ignored: the
        accelerator layer picks the device)."""
        schedule, own = split_json(section, (NoiseSchedule, cls), ("device",), where)
        own["model_id"] = section.get("model_id", cls.model_id)
        return cls(schedule=NoiseSchedule(**schedule), **own)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float,
                             guidance_rescale: float = 0.0) -> torch.Tensor:
    """``uncond + scale (cond - uncond)``; with ``guidance_rescale`` > 0 blended with that result
    rescaled to the per-sample std of ``cond`` (Lin et al. 2023, section 3.4)."""
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def inference_timesteps(num_train_steps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """float64, descending; not yet rounded under ``linspace``."""
    n = num_train_steps
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1].copy() + steps_offset
    return np.round(np.arange(n, 0, -n / steps)) - 1


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the generator's device (the CPU for a CPU generator), then moved."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class DDPMSampler:
    """``timesteps`` (what the DiT is given, one per step), ``init_noise_sigma``,
    ``scale_model_input(sample)`` and ``step(model_output, sample, generator)``, in that order each step."""

    timesteps: torch.Tensor
    init_noise_sigma: float = 1.0

    def __init__(self, config: DDPMSamplerConfig):
        self.config = config
        self.index = 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def scale_model_input(self, sample: torch.Tensor) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class EulerDiscrete(DDPMSampler):
    """Euler steps on the sigma levels; ``ancestral`` adds fresh noise each step."""

    def __init__(self, config: DDPMSamplerConfig, ancestral: bool = False):
        super().__init__(config)
        s = config.schedule
        a = s.alphas_cumprod()
        if s.rescale_betas_zero_snr:
            a[-1] = 2.0 ** -24  # a finite first sigma
        timesteps = inference_timesteps(s.num_train_steps, config.num_inference_steps, config.spacing,
                                        config.steps_offset).astype(np.float32)
        train_sigmas = (((1 - a) / a) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps)
        top = self.sigmas.max()
        self.init_noise_sigma = float(top if config.spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5)
        self.ancestral = ancestral

    def scale_model_input(self, sample: torch.Tensor) -> torch.Tensor:
        return sample / ((self.sigmas[self.index] ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        x, out = sample.float(), model_output.float()
        if self.config.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        derivative = (x - x0) / sigma
        if self.ancestral:
            sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
            sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
            x = x + derivative * (sigma_down - sigma) + _randn(model_output.shape, model_output, generator) * sigma_up
        else:
            x = x + derivative * (sigma_next - sigma)
        self.index += 1
        return x.to(sample.dtype)


class _AlphaSampler(DDPMSampler):
    """DDIM and DDPM: integer timesteps, ``a_t`` from the training schedule."""

    def __init__(self, config: DDPMSamplerConfig):
        super().__init__(config)
        s = config.schedule
        self.alphas_cumprod = s.alphas_cumprod()
        t = inference_timesteps(s.num_train_steps, config.num_inference_steps, config.spacing, config.steps_offset)
        self.timesteps = torch.from_numpy(t.round().astype(np.int64))

    def _x0_eps(self, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor):
        """The predicted clean sample (clipped if asked) and noise."""
        if self.config.prediction_type == "epsilon":
            x0, eps = (x - (1 - a_t) ** 0.5 * out) / a_t ** 0.5, out
        else:
            x0, eps = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out, a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps


class DDIM(_AlphaSampler):
    def __init__(self, config: DDPMSamplerConfig):
        super().__init__(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.stride = config.schedule.num_train_steps // config.num_inference_steps

    def step(self, model_output: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        t = int(self.timesteps[self.index])
        prev = t - self.stride
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x, out = sample.float(), model_output.float()
        x0, eps = self._x0_eps(out, x, a_t)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.config.eta * variance ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.config.eta > 0:
            x = x + std * _randn(model_output.shape, model_output, generator)
        self.index += 1
        return x.to(sample.dtype)


class DDPM(_AlphaSampler):
    def step(self, model_output: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        i = self.index
        t = int(self.timesteps[i])
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[int(self.timesteps[i + 1])] if i + 1 < len(self.timesteps) else torch.tensor(1.0)
        alpha = a_t / a_prev
        x, out = sample.float(), model_output.float()
        x0, _ = self._x0_eps(out, x, a_t)
        x = (a_prev ** 0.5 * (1 - alpha) / (1 - a_t)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            # the posterior variance, floored as diffusers floors it (its log is taken elsewhere)
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * (1 - alpha), min=1e-20)
            x = x + variance ** 0.5 * _randn(model_output.shape, model_output, generator)
        self.index += 1
        return x.to(sample.dtype)


def build_ddpm_sampler(config: DDPMSamplerConfig) -> DDPMSampler:
    if config.model_id == "EulerAncestralDiscrete":
        return EulerDiscrete(config, ancestral=True)
    if config.model_id == "EulerDiscrete":
        return EulerDiscrete(config)
    if config.model_id == "DDIM":
        return DDIM(config)
    return DDPM(config)
