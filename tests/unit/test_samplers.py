"""Flow-matching samplers against diffusers' schedulers (the oracle) on the same velocity field:
UniPC as Wan's pipelines configure it, Euler as FlowMatchEulerDiscreteScheduler; and the exactness
both must have on a field whose trajectories are straight lines."""

from __future__ import annotations

import pytest
import torch

from mm.diffusion.samplers import FlowDPMPP, FlowEuler, FlowUniPC, build_sampler


def _field(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A smooth velocity field that depends on the sample and the timestep."""
    t = timestep.float() / 1000
    return 0.4 * sample + torch.sin(3 * t) * torch.linspace(-1, 1, sample.shape[-1]) - 0.2 * t * sample ** 2


def _run(sampler_step, timesteps, x):
    trajectory = []
    for t in timesteps:
        x = sampler_step(_field(x, t), x, t)
        trajectory.append(x)
    return trajectory


def _oracle(solver: str, shift: float):
    """diffusers' scheduler configured as Wan's pipelines configure it for ``solver``."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000)
    if solver == "unipc":
        return UniPCMultistepScheduler(**flow), FlowUniPC
    return DPMSolverMultistepScheduler(**flow, solver_order=2, algorithm_type="dpmsolver++"), FlowDPMPP


@pytest.mark.parametrize("solver,steps,shift", [(s, n, f) for s in ("unipc", "dpm++")
                                                for n, f in [(1, 3.0), (2, 5.0), (5, 5.0), (12, 3.0), (25, 1.0)]])
def test_multistep_samplers_match_diffusers(solver, steps, shift):
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    oracle, ours_cls = _oracle(solver, shift)
    oracle.set_timesteps(steps)
    ours = ours_cls(steps, shift)
    assert torch.equal(ours.timesteps, oracle.timesteps)
    torch.testing.assert_close(ours.sigmas, oracle.sigmas, rtol=0, atol=0)
    expected = _run(lambda v, s, t: oracle.step(v, t, s, return_dict=False)[0], oracle.timesteps, x)
    got = _run(lambda v, s, t: ours.step(v, s), ours.timesteps, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (4, 5.0), (20, 3.0)])
def test_euler_matches_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    oracle = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    oracle.set_timesteps(steps)
    ours = FlowEuler(steps, shift)
    torch.testing.assert_close(ours.timesteps, oracle.timesteps.float(), rtol=1e-6, atol=1e-4)
    expected = _run(lambda v, s, t: oracle.step(v, t, s, return_dict=False)[0], oracle.timesteps, x)
    got = _run(lambda v, s, t: ours.step(v, s), ours.timesteps, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_straight_trajectories_end_at_their_data_point(solver):
    """With v = noise - x0 for a fixed x0 (what a perfect model predicts for one data point), every
    sampler must land on x0 whatever the number of steps."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    for steps in (1, 3, 10):
        sampler = build_sampler(solver, steps, shift=3.0)
        # on the trajectory at the first level (dpm++ starts just below sigma 1, at shift(1 - 1/N))
        x = (1 - sampler.sigmas[0]) * x0 + sampler.sigmas[0] * noise
        for _ in sampler.timesteps:
            x = sampler.step(noise - x0, x)
        torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="sample_solver 'ddim'; valid: unipc, dpm\\+\\+, euler"):
        build_sampler("ddim", 10, 3.0)
    with pytest.raises(ValueError, match="sample_steps 0"):
        build_sampler("unipc", 0, 3.0)
    with pytest.raises(ValueError, match="sample_shift -1"):
        build_sampler("euler", 5, -1)
