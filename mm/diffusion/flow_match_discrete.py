"""Step-Video-T2V's flow matching: the Euler sampler of its release (``FlowMatchDiscreteScheduler``) and
the training objective that agrees with it.

Convention (``reverse`` false, the release's): the level ``t`` in [0, 1] is the fraction of DATA in the
sample, ``x_t = t x0 + (1 - t) noise``: ``t = 0`` is pure noise, ``t = 1`` the clean latent. The DiT
predicts the velocity ``dx_t/dt = x0 - noise`` and is given ``t`` itself; the DiT multiplies it by 1000
(its adaLN-single timestep embedding), not the sampler. Sampling walks ``t`` up from 0:
``sigmas = 1 - shift(linspace(1, 0, N + 1))`` with ``shift(s) = k s / (1 + (k - 1) s)``, so the DiT sees
``timesteps = sigmas[:-1]`` in [0, 1) (never 1) and each Euler step is ``x += (sigmas[i + 1] - sigmas[i]) v``
in fp32. ``reverse`` true keeps ``sigmas = shift(linspace(1, 0, N + 1))`` (``t`` the fraction of noise,
walked down from 1; ``x_t = (1 - t) x0 + t noise``, velocity ``noise - x0``).

How it differs from Wan's (``mm.diffusion.flow_matching``, ``mm.diffusion.samplers``): Wan's level
``sigma`` is the fraction of NOISE (``x = (1 - sigma) x0 + sigma noise``), its velocity is
``noise - x0`` and its DiT is given ``sigma * 1000``. The same noisy sample is Step-Video's level
``t = 1 - sigma``; the velocity has the opposite sign, and the timestep value runs the other way (a
mostly-noise sample is near 1000 for Wan, near 0 for Step-Video). The shift formula is the same, applied
to the noise fraction in both (Step-Video: ``1 - t = shift(s)``), so a shift above 1 spends the steps
near the noise end in both.

Training (``FlowMatchDiscrete``): the level is drawn on the grid ``k / N`` (``N =
num_train_timesteps``), ``k = floor(N u)`` with ``u ~ sigmoid(Normal(logit_mean, logit_std))``
(``sample_method`` "logit_normal", the default) or ``u ~ Uniform(0, 1)``; no shift is applied in
training. The noisy input and the target are derived from the sampler above, so that a DiT that
predicts the target exactly takes noise to data under ``FlowMatchDiscreteSampler``'s steps. The loss is
the squared error averaged over every element; ``precondition_outputs`` measures it on the data
estimate ``x0 = x_t + (end - t) v`` instead (``end`` the level of clean data: 1, or 0 under
``reverse``), i.e. each sample's squared velocity error weighted by ``(end - t)^2``. The level's
distribution is MindSpeed-MM's (its ``FlowMatchDiscreteScheduler.q_sample`` with the Step-Video training
JSON: ``floor(1000 u)``, ``u`` logit-normal(0, 1), indexes the DiT's timestep); its noisy input
``(1 - t) x0 + t noise`` and target ``noise - x0`` at that timestep follow Wan's convention, the opposite
of the sampler's under ``reverse`` false, and it gives the DiT ``1000 t`` where the sampler gives ``t``,
so those parts are not taken from it.

The model JSON's ``diffusion`` section (``model_id`` "flow_match_discrete_scheduler") takes
MindSpeed-MM's keys: ``num_train_timesteps``, ``num_inference_timesteps``, ``shift``, ``reverse``,
``solver``, ``sample_method``, ``logit_mean``, ``logit_std``, ``precondition_outputs``. Here
``num_train_timesteps`` is only the size of the training grid: whatever its value, the DiT is given
``t`` in [0, 1].

Classifier-free guidance (``guided_velocity``): the release runs one batch of two, [conditional,
unconditional], and combines ``uncond + scale (cond - uncond)`` in the DiT's output dtype; guidance is
on when the scale is above 1.

What the release's pipeline does around the sampler (a family's denoise loop to match it): the initial
noise is drawn in bf16, each timestep is cast to the DiT's dtype (bf16) before the DiT's x1000, the DiT's
output stays bf16 through guidance, and the latents are fp32 from the first step on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from mm.diffusion.ddpm_samplers import classifier_free_guidance
from mm.diffusion.flow_matching import shift_sigma
from mm.diffusion.samplers import FlowSampler

MODEL_ID = "flow_match_discrete_scheduler"
SOLVERS = ("euler",)
SAMPLE_METHODS = ("logit_normal", "uniform")

STEP_VIDEO_STEPS = 50
STEP_VIDEO_SHIFT = 13.0
STEP_VIDEO_TURBO_SHIFT = 17.0  # Step-Video-T2V-Turbo (10-15 steps)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class FlowMatchDiscreteConfig:
    """The ``diffusion`` section, with MindSpeed-MM's key names; defaults are the Step-Video-T2V release's."""

    num_train_timesteps: int = 1000
    num_inference_timesteps: int = STEP_VIDEO_STEPS
    shift: float = STEP_VIDEO_SHIFT
    reverse: bool = False
    solver: str = "euler"
    sample_method: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    precondition_outputs: bool = False

    def __post_init__(self) -> None:
        problems = []
        for key in ("num_train_timesteps", "num_inference_timesteps"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                problems.append(f"diffusion.{key} = {value!r}; valid: an integer >= 1")
        if not _is_number(self.shift) or not self.shift > 0:
            problems.append(f"diffusion.shift = {self.shift!r}; valid: a number > 0 (Step-Video-T2V: 13.0, "
                            f"Turbo: 17.0)")
        for key in ("reverse", "precondition_outputs"):
            if not isinstance(getattr(self, key), bool):
                problems.append(f"diffusion.{key} = {getattr(self, key)!r}; valid: true, false")
        if self.solver not in SOLVERS:
            problems.append(f"diffusion.solver = {self.solver!r}; valid: {', '.join(SOLVERS)}")
        if self.sample_method not in SAMPLE_METHODS:
            problems.append(f"diffusion.sample_method = {self.sample_method!r}; valid: {', '.join(SAMPLE_METHODS)}")
        if not _is_number(self.logit_mean):
            problems.append(f"diffusion.logit_mean = {self.logit_mean!r}; valid: a number")
        if not _is_number(self.logit_std) or not self.logit_std > 0:
            problems.append(f"diffusion.logit_std = {self.logit_std!r}; valid: a number > 0")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_json(cls, section: dict[str, Any]) -> "FlowMatchDiscreteConfig":
        """From a model JSON's ``diffusion`` section (``model_id`` "flow_match_discrete_scheduler")."""
        model_id = section.get("model_id", MODEL_ID)
        if model_id != MODEL_ID:
            raise ValueError(f"diffusion.model_id = {model_id!r}; valid: {MODEL_ID}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(k for k in section if k != "model_id" and k not in known)
        if unknown:
            raise ValueError(f"diffusion: unknown key(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(known + ['model_id']))}")
        return cls(**{k: v for k, v in section.items() if k != "model_id"})

    def sampler(self, steps: int | None = None, shift: float | None = None) -> "FlowMatchDiscreteSampler":
        """The sampler of this section (``num_inference_timesteps``, ``shift``), or of the steps and shift given."""
        return FlowMatchDiscreteSampler(self.num_inference_timesteps if steps is None else steps,
                                        self.shift if shift is None else shift, self.reverse)


class FlowMatchDiscreteSampler(FlowSampler):
    """Step-Video's Euler sampler. ``sigmas`` (float32, ``steps + 1``): the levels, from the noise end to
    the data end (0 -> 1, or 1 -> 0 under ``reverse``); ``timesteps = sigmas[:-1]``: what the DiT is
    given at each step (in [0, 1]; the DiT scales it by 1000). ``step`` returns fp32."""

    def __init__(self, steps: int = STEP_VIDEO_STEPS, shift: float = STEP_VIDEO_SHIFT, reverse: bool = False):
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"sampling steps = {steps!r}; valid: an integer >= 1")
        if not _is_number(shift) or not shift > 0:
            raise ValueError(f"sampling shift = {shift!r}; valid: a number > 0")
        # float32 throughout, the precision the reference builds its schedule in
        noise_fraction = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32), shift)
        self.sigmas = noise_fraction if reverse else 1 - noise_fraction
        self.timesteps = self.sigmas[:-1]
        self.reverse = reverse
        self.index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """``sample + (sigmas[i + 1] - sigmas[i]) velocity`` in fp32, ``i`` the given index or the next
        step's (a counter that each call advances)."""
        i = self.index if index is None else index
        if not 0 <= i < len(self.timesteps):
            raise IndexError(f"step index {i}; this sampler has {len(self.timesteps)} steps")
        dt = self.sigmas[i + 1] - self.sigmas[i]
        self.index = i + 1
        return sample.float() + velocity.float() * dt.to(sample.device)


class FlowMatchDiscrete:
    """The training objective that agrees with ``FlowMatchDiscreteSampler`` (see the module docstring)."""

    def __init__(self, config: FlowMatchDiscreteConfig):
        if config.num_train_timesteps < 2:
            raise ValueError(f"diffusion.num_train_timesteps = {config.num_train_timesteps}: training draws its "
                             "levels on the grid k / num_train_timesteps in [0, 1); valid for training: an integer "
                             ">= 2 (MindSpeed-MM's Step-Video training JSON: 1000; its inference JSON's 1 is for "
                             "sampling only)")
        self.config = config
        self.data_end = 0.0 if config.reverse else 1.0

    def sample_levels(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
        """``[batch]`` fp32 levels ``t = k / N``, ``k = floor(N u)`` in [0, N), ``u`` from ``sample_method``."""
        c = self.config
        if c.sample_method == "logit_normal":
            u = torch.sigmoid(c.logit_mean + c.logit_std * torch.randn(batch, generator=generator,
                                                                       dtype=torch.float64))
        else:
            u = torch.rand(batch, generator=generator, dtype=torch.float64)
        n = c.num_train_timesteps
        k = torch.floor(u * n).clamp(0, n - 1)
        return (k / n).float().to(device)

    @staticmethod
    def timesteps(levels: torch.Tensor) -> torch.Tensor:
        """What the DiT is given: the level itself (the DiT multiplies it by 1000)."""
        return levels

    def _data_fraction(self, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = levels.reshape(-1, *([1] * (like.dim() - 1))).to(like.device, like.dtype)
        return 1 - t if self.config.reverse else t

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``x_t = t x0 + (1 - t) noise`` (``reverse``: ``(1 - t) x0 + t noise``), in ``x0``'s dtype."""
        a = self._data_fraction(levels, x0)
        return a * x0 + (1 - a) * noise.to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity ``d x_t / d t``: ``x0 - noise`` (``reverse``: ``noise - x0``)."""
        noise = noise.to(x0.dtype)
        return noise - x0 if self.config.reverse else x0 - noise

    def loss_weights(self, levels: torch.Tensor) -> torch.Tensor | None:
        """``[b]`` fp32 ``(end - t)^2`` under ``precondition_outputs``, else None."""
        if not self.config.precondition_outputs:
            return None
        return (self.data_end - levels.float()) ** 2

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 scalar: the squared error averaged over every element (per-sample weighted by
        ``loss_weights(levels)`` under ``precondition_outputs``, which then needs ``levels``)."""
        err = (prediction.float() - target.float()) ** 2
        if self.config.precondition_outputs:
            if levels is None:
                raise ValueError("diffusion.precondition_outputs = true: the loss needs each sample's level")
            b = prediction.shape[0]
            err = err.reshape(b, -1) * self.loss_weights(levels).to(err.device).reshape(b, 1)
        return err.mean()

    def sampler(self, steps: int | None = None, shift: float | None = None) -> FlowMatchDiscreteSampler:
        return self.config.sampler(steps, shift)


def guidance_enabled(guidance_scale: float) -> bool:
    """Whether the release runs the unconditional branch: a scale above 1."""
    return guidance_scale > 1.0


def guided_velocity(output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The DiT's output on a batch [conditional half; unconditional half] combined as
    ``uncond + scale (cond - uncond)``, in the output's dtype."""
    if output.shape[0] % 2:
        raise ValueError(f"guided_velocity: a batch of {output.shape[0]}; expected [cond; uncond] halves")
    cond, uncond = output.chunk(2)
    return classifier_free_guidance(uncond, cond, guidance_scale)
