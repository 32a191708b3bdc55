"""Wan's flow-matching objective: the shifted schedule against diffusers' scheduler, expert ranges."""

from __future__ import annotations

import pytest
import torch

from mm.diffusion import FlowMatching, FlowMatchingConfig, shift_sigma, unshift_sigma


def test_shift_matches_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    sched.set_timesteps(50)
    # the scheduler's grid before its shift runs from 1 to its sigma_min
    unshifted = torch.linspace(1.0, sched.sigma_min, 50, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(unshifted, 5.0).float(), sched.sigmas[:-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(unshift_sigma(shift_sigma(unshifted, 5.0), 5.0), unshifted)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_expert_ranges_and_noising(sampling):
    high = FlowMatching(FlowMatchingConfig(shift=12.0, timestep_sampling=sampling, min_timestep=875.0))
    low = FlowMatching(FlowMatchingConfig(shift=12.0, timestep_sampling=sampling, max_timestep=875.0))
    g = torch.Generator().manual_seed(0)
    t_high = high.timesteps(high.sample_sigmas(4096, g))
    t_low = low.timesteps(low.sample_sigmas(4096, g))
    assert t_high.min() >= 875.0 - 1e-3 and t_high.max() <= 1000.0
    assert t_low.max() <= 875.0 + 1e-3 and t_low.min() >= 0.0
    assert t_low.std() > 50  # spread over the range, not stuck at an end
    x0, noise = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    sig = torch.tensor([0.0, 0.5, 1.0])
    xt = FlowMatching.noisy(x0, noise, sig)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    # the velocity target moves x_t along the path: x_t + (s' - s) v stays on the line
    torch.testing.assert_close(xt[1] + 0.5 * FlowMatching.target(x0, noise)[1], noise[1])


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="diffusion.timestep_sampling = 'cosine'"):
        FlowMatchingConfig(timestep_sampling="cosine")
    with pytest.raises(ValueError, match="diffusion.min_timestep = 900.0, max_timestep = 800.0"):
        FlowMatchingConfig(min_timestep=900.0, max_timestep=800.0)
