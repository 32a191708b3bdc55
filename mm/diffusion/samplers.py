"""Samplers for flow-matching DiTs: the model predicts the velocity ``v = noise - x0`` at noise
level ``sigma`` (``x_t = (1 - sigma) x0 + sigma noise``), and a sampler walks ``sigma`` from 1 to 0.

* ``unipc``: UniPC multistep (Zhao et al. 2023), bh2 variant, data prediction (``x0 = x - sigma v``),
  order 2 with a corrector after every step but the first, order 1 on the last step: Wan's default.
  The schedule: ``steps`` levels evenly spaced in (1/N, 1] (N = ``num_train_timesteps``), shifted
  by ``shift sigma / (1 + (shift - 1) sigma)``, the first nudged below 1 (its log-SNR must be
  finite), then 0.
* ``dpm++``: DPM-Solver++ 2M (Lu et al. 2022), data prediction, second order with the midpoint
  correction from the second step on, first order on the last step (the one to sigma 0). The
  schedule: ``1 - sigma`` evenly spaced in [1/N, 1) ... shifted and reversed: ``steps`` levels from
  ``shift(1 - 1/N)`` down, then 0.
* ``euler``: first-order steps ``x += (sigma_next - sigma) v`` over ``steps`` levels evenly spaced
  between the shifted schedule's ends (1 and shift(1/N)), shifted (again), then 0.

The DiT sees ``timestep = sigma * N``; UniPC's timesteps are truncated to integers, as Wan's
release and diffusers feed them. All schedule arithmetic is float64 numpy, the sigmas float32,
the updates in the sample's dtype.
"""

from __future__ import annotations

import numpy as np
import torch

SOLVERS = ("unipc", "dpm++", "euler")


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowSampler:
    """``timesteps`` (what the DiT is given, one per step) and ``step(velocity, sample)``."""

    sigmas: torch.Tensor  # float32, steps + 1 (last 0)
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FlowEuler(FlowSampler):
    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000):
        _check(steps, shift)
        n = num_train_timesteps
        # evenly spaced between the shifted ends of the training schedule (1 and shift(1/N)), shifted
        sigmas = _shift(np.linspace(1.0, _shift(np.array(1.0 / n), shift), steps), shift)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self.timesteps = self.sigmas[:-1] * n
        self.index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        dt = self.sigmas[self.index + 1] - self.sigmas[self.index]
        self.index += 1
        return (sample.float() + dt * velocity.float()).to(sample.dtype)


class FlowUniPC(FlowSampler):
    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000, order: int = 2):
        _check(steps, shift)
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order {order}; valid: 1, 2, 3")
        n = num_train_timesteps
        sigmas = _shift(np.linspace(1, 1 / n, steps + 1)[:-1], shift)
        if abs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6
        self.timesteps = torch.from_numpy((sigmas * n).copy()).to(torch.int64)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self.order = order
        self.index = 0
        self._x0: list[torch.Tensor] = []  # data predictions of the last ``order`` steps, oldest first
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0

    def _lambda(self, i: int) -> torch.Tensor:
        """log-SNR ``log(alpha / sigma)`` of level ``i`` (alpha = 1 - sigma)."""
        s = self.sigmas[i]
        return torch.log(1 - s) - torch.log(s)

    def _coefficients(self, lam_t, lam_s0, earlier: list[int], order: int):
        """h, e^{-h} - 1, the B(h) of bh2, and the ratios r_k and the right-hand side b of UniPC's
        linear system, for a step from log-SNR ``lam_s0`` to ``lam_t`` with the earlier levels' indices."""
        h = lam_t - lam_s0
        rks = [(self._lambda(i) - lam_s0) / h for i in earlier] + [torch.ones(())]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        R, b = [], []
        rks_t = torch.stack(rks)
        for k in range(1, order + 1):
            R.append(torch.pow(rks_t, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return h_phi_1, b_h, rks, torch.stack(R), torch.stack(b)

    def _alpha_sigma(self, i: int):
        s = self.sigmas[i]
        return 1 - s, s

    def _predict(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """The predictor from level ``index`` to ``index + 1``."""
        i = self.index
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        _, sigma_s0 = self._alpha_sigma(i)
        m0 = self._x0[-1]
        earlier = [i - k for k in range(1, order)]
        h_phi_1, b_h, rks, R, b = self._coefficients(self._lambda(i + 1), self._lambda(i), earlier, order)
        x = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if order > 1:
            d1s = torch.stack([(self._x0[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)], dim=1)
            rhos = torch.full((1,), 0.5, dtype=sample.dtype) if order == 2 else \
                torch.linalg.solve(R[:-1, :-1], b[:-1]).to(sample.dtype)
            rhos = rhos.to(sample.device)  # the schedule lives on the CPU
            x = x - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos, d1s)
        return x.to(sample.dtype)

    def _correct(self, sample: torch.Tensor, x0_now: torch.Tensor, order: int) -> torch.Tensor:
        """The corrector of the step just taken (level ``index - 1`` to ``index``), with the new
        data prediction ``x0_now``."""
        i = self.index
        alpha_t, sigma_t = self._alpha_sigma(i)
        _, sigma_s0 = self._alpha_sigma(i - 1)
        m0 = self._x0[-1]
        earlier = [i - 1 - k for k in range(1, order)]
        h_phi_1, b_h, rks, R, b = self._coefficients(self._lambda(i), self._lambda(i - 1), earlier, order)
        last = self._last_sample
        x = sigma_t / sigma_s0 * last - alpha_t * h_phi_1 * m0
        rhos = torch.full((1,), 0.5, dtype=last.dtype) if order == 1 else torch.linalg.solve(R, b).to(last.dtype)
        rhos = rhos.to(last.device)
        correction = rhos[-1] * (x0_now - m0)
        if order > 1:
            d1s = torch.stack([(self._x0[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)], dim=1)
            correction = correction + torch.einsum("k,bkc...->bc...", rhos[:-1], d1s)
        return (x - alpha_t * b_h * correction).to(last.dtype)

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        x0 = sample - self.sigmas[self.index] * velocity
        if self.index > 0 and self._last_sample is not None:
            sample = self._correct(sample, x0, self._last_order)
        self._x0 = (self._x0 + [x0])[-self.order:]
        order = min(self.order, len(self.timesteps) - self.index, len(self._x0))
        self._last_sample, self._last_order = sample, order
        out = self._predict(sample, order)
        self.index += 1
        return out


class FlowDPMPP(FlowSampler):
    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000):
        _check(steps, shift)
        n = num_train_timesteps
        sigmas = np.flip(_shift(1.0 - np.linspace(1, 1 / n, steps + 1), shift))[:-1].copy()
        self.timesteps = torch.from_numpy((sigmas * n).copy()).to(torch.int64)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self.index = 0
        self._x0: list[torch.Tensor] = []

    def _lambda(self, i: int) -> torch.Tensor:
        s = self.sigmas[i]
        return torch.log(1 - s) - torch.log(s)

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.index
        x0 = sample - self.sigmas[i] * velocity
        self._x0 = (self._x0 + [x0])[-2:]
        x = sample.float()
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        h = self._lambda(i + 1) - self._lambda(i)
        first_order = len(self._x0) < 2 or i == len(self.timesteps) - 1
        # sigma 0 at the end: lambda is infinite there and the first-order step lands on x0 itself
        out = sigma_t / sigma_s0 * x - alpha_t * torch.expm1(-h) * self._x0[-1]
        if not first_order:
            r0 = (self._lambda(i) - self._lambda(i - 1)) / h
            d1 = (self._x0[-1] - self._x0[-2]) / r0
            out = out - 0.5 * alpha_t * torch.expm1(-h) * d1
        self.index += 1
        return out.to(sample.dtype)


def build_sampler(solver: str, steps: int, shift: float, num_train_timesteps: int = 1000) -> FlowSampler:
    if solver == "unipc":
        return FlowUniPC(steps, shift, num_train_timesteps)
    if solver == "euler":
        return FlowEuler(steps, shift, num_train_timesteps)
    if solver == "dpm++":
        return FlowDPMPP(steps, shift, num_train_timesteps)
    raise ValueError(f"sample_solver {solver!r}; valid: {', '.join(SOLVERS)}")


def _check(steps: int, shift: float) -> None:
    if steps < 1:
        raise ValueError(f"sample_steps {steps}; valid: >= 1")
    if shift <= 0:
        raise ValueError(f"sample_shift {shift}; valid: > 0")
