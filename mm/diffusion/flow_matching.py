"""Wan's flow-matching training objective.

A clean latent ``x0`` and Gaussian noise are mixed as ``x_t = (1 - sigma) x0 + sigma noise``; the DiT
sees ``timestep = sigma * num_train_timesteps`` and predicts the velocity ``noise - x0``. ``sigma``
comes from ``u`` in (0, 1), drawn uniformly or logit-normally, through Wan's timestep shift
``sigma = shift u / (1 + (shift - 1) u)``. A Wan2.2 A14B expert trains only on its part of the
timesteps (``min_timestep``/``max_timestep``, e.g. the high-noise expert above the boundary): ``u`` is
then drawn from the matching interval directly, so no sample is wasted or rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLINGS = ("uniform", "logit_normal")


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of ``shift_sigma``."""
    return sigma / (shift - (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowMatchingConfig:
    num_train_timesteps: int = 1000
    shift: float = 5.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_timestep: float = 0.0  # this expert's range of timesteps, in [0, num_train_timesteps]
    max_timestep: float = 1000.0

    def __post_init__(self) -> None:
        if self.timestep_sampling not in SAMPLINGS:
            raise ValueError(f"diffusion.timestep_sampling = {self.timestep_sampling!r}; valid: {', '.join(SAMPLINGS)}")
        if not 0 <= self.min_timestep < self.max_timestep <= self.num_train_timesteps:
            raise ValueError(f"diffusion.min_timestep = {self.min_timestep}, max_timestep = {self.max_timestep}: need "
                             f"0 <= min < max <= num_train_timesteps ({self.num_train_timesteps})")
        if self.shift <= 0:
            raise ValueError(f"diffusion.shift = {self.shift}; valid: > 0")


class FlowMatching:
    def __init__(self, config: FlowMatchingConfig):
        self.config = config

    def sample_sigmas(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
        """``[batch]`` noise levels in this expert's range (fp32)."""
        c = self.config
        lo = unshift_sigma(torch.tensor(c.min_timestep / c.num_train_timesteps, dtype=torch.float64), c.shift)
        hi = unshift_sigma(torch.tensor(c.max_timestep / c.num_train_timesteps, dtype=torch.float64), c.shift)
        p = torch.rand(batch, generator=generator, dtype=torch.float64)
        if c.timestep_sampling == "uniform":
            u = lo + (hi - lo) * p
        else:  # logit-normal, truncated to [lo, hi] by inverting its CDF
            def cdf(x):
                return torch.special.ndtr((torch.logit(x.clamp(1e-12, 1 - 1e-12)) - c.logit_mean) / c.logit_std)

            q = cdf(lo) + (cdf(hi) - cdf(lo)) * p
            u = torch.sigmoid(c.logit_mean + c.logit_std * torch.special.ndtri(q))
        return shift_sigma(u, c.shift).float().to(device)

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * self.config.num_train_timesteps

    @staticmethod
    def noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over every element, in fp32."""
        return torch.mean((prediction.float() - target.float()) ** 2)
