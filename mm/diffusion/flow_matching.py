"""Wan's flow-matching training objective.

A clean latent ``x0`` and Gaussian noise are mixed as ``x_t = (1 - sigma) x0 + sigma noise``; the DiT
sees ``timestep = sigma * num_train_timesteps`` and predicts the velocity ``noise - x0``. ``sigma``
comes from ``u`` in (0, 1), drawn uniformly or logit-normally, through Wan's timestep shift
``sigma = shift u / (1 + (shift - 1) u)``. A Wan2.2 A14B expert trains only on its part of the
timesteps (``min_timestep``/``max_timestep``, e.g. the high-noise expert above the boundary): ``u`` is
then drawn from the matching interval directly, so no sample is wasted or rejected.

MindSpeed-MM's and DiffSynth-Studio's Wan training (``wan_flow_match_scheduler``) draws instead from a
grid of ``timestep_grid`` noise levels, ``linspace(sigma_max, sigma_min, N)`` (``extra_one_step``:
``N + 1`` points, the last dropped) through the shift, and weights each sample's loss by the grid's
"bsmntw" weights (``loss_weighting``): ``exp(-2 ((t - N/2) / N)^2)`` of its timestep ``t``, less the
smallest, scaled to average 1 over the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLINGS = ("uniform", "logit_normal")
WEIGHTINGS = ("none", "bsmntw")


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
    # a grid of noise levels to draw from (None: continuous), its ends and MindSpeed-MM's extra step
    timestep_grid: int | None = None
    sigma_min: float = 0.0
    sigma_max: float = 1.0
    extra_one_step: bool = False
    loss_weighting: str = "none"

    def __post_init__(self) -> None:
        if self.loss_weighting not in WEIGHTINGS:
            raise ValueError(f"diffusion.loss_weighting = {self.loss_weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if self.loss_weighting != "none" and self.timestep_grid is None:
            raise ValueError(f"diffusion.loss_weighting = {self.loss_weighting!r} weights a grid of timesteps; give "
                             "diffusion.timestep_grid (e.g. 1000)")
        if self.timestep_grid is not None and (self.timestep_grid < 2 or self.timestep_sampling != "uniform"):
            raise ValueError(f"diffusion.timestep_grid = {self.timestep_grid}: a grid of >= 2 levels, drawn uniformly "
                             f"(timestep_sampling 'uniform', not {self.timestep_sampling!r})")
        if not 0.0 <= self.sigma_min < self.sigma_max <= 1.0:
            raise ValueError(f"diffusion.sigma_min = {self.sigma_min}, sigma_max = {self.sigma_max}: need 0 <= min < "
                             "max <= 1")
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
        self.grid = self.grid_weights = None
        if config.timestep_grid is not None:
            n = config.timestep_grid
            sigmas = torch.linspace(config.sigma_max, config.sigma_min, n + 1 if config.extra_one_step else n,
                                    dtype=torch.float64)[:n]
            self.grid = shift_sigma(sigmas, config.shift)
            t = self.grid * config.num_train_timesteps
            y = torch.exp(-2 * ((t - n / 2) / n) ** 2)
            y = y - y.min()
            self.grid_weights = y * (n / y.sum())

    @property
    def weighted(self) -> bool:
        return self.config.loss_weighting != "none"

    def sample_sigmas(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
        """``[batch]`` noise levels in this expert's range (fp32)."""
        c = self.config
        if self.grid is not None:  # an index in the expert's share of the grid, uniformly
            n = c.timestep_grid
            lo, hi = int(c.min_timestep / c.num_train_timesteps * n), int(c.max_timestep / c.num_train_timesteps * n)
            index = torch.randint(lo, hi, (batch,), generator=generator)
            return self.grid[index].to(device=device, dtype=torch.float32)
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

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``[batch]`` loss weights of the noise levels ``sigmas`` (drawn from the grid): the grid point's."""
        grid = self.grid.to(sigmas.device)
        index = (grid[None, :] - sigmas.double()[:, None]).abs().argmin(dim=1)
        return self.grid_weights.to(sigmas.device)[index].float()

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error over every element, in fp32; with ``weights [b]``, each sample's mean error
        times its weight, averaged over the samples."""
        error = (prediction.float() - target.float()) ** 2
        if weights is None:
            return torch.mean(error)
        return torch.mean(error.flatten(1).mean(dim=1) * weights.float())
