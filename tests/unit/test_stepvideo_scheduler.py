"""Step-Video-T2V's sampler and training objective (mm.diffusion.flow_match_discrete) against the reference.

Oracle: ``stepvideo/diffusion/scheduler.py`` of stepfun-ai/Step-Video-T2V at 675e08c0dd08aaf60b4da1a2ce57e9bd0d8af31c.
``tests/fixtures/stepvideo/scheduler_golden.json`` holds its schedules and Euler steps (written by
``make_scheduler_fixtures.py`` there, which documents how); the ``ref`` tests run the reference live when
``MM_STEP_VIDEO_REF`` names a checkout of it (they skip otherwise). The objective is checked against the
sampler: a DiT that predicts the training target exactly must take pure noise to the data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from mm.diffusion import (FlowMatchDiscrete, FlowMatchDiscreteConfig, FlowMatchDiscreteSampler, guidance_enabled,
                          guided_velocity)
from mm.diffusion.flow_match_discrete import MODEL_ID, STEP_VIDEO_TURBO_SHIFT

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stepvideo"
GOLDEN = json.loads((FIXTURES / "scheduler_golden.json").read_text())
REF_ENV = "MM_STEP_VIDEO_REF"

# the ``diffusion`` sections of MindSpeed-MM's examples/stepvideo/t2v/{pretrain,inference}_t2v_model.json at
# d68a9328c06ab2d1dec7b5556ba8cf6846e464d0
MINDSPEED_TRAINING = {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1000, "shift": 13.0,
                      "reverse": False, "solver": "euler"}
MINDSPEED_INFERENCE = {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1,
                       "num_inference_timesteps": 50, "shift": 13.0, "reverse": False, "solver": "euler"}


def _maker():
    spec = importlib.util.spec_from_file_location("stepvideo_make_scheduler_fixtures",
                                                  FIXTURES / "make_scheduler_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    """The reference scheduler module, or a skip when ``MM_STEP_VIDEO_REF`` is unset."""
    root = os.environ.get(REF_ENV)
    if not root:
        pytest.skip(f"{REF_ENV} is unset: the live reference tests need a checkout of stepfun-ai/Step-Video-T2V at "
                    f"{GOLDEN['reference']['commit']} (the golden-fixture tests cover CI)")
    maker = _maker()
    head = maker.reference_commit(root)
    if head is not None and head != maker.COMMIT:
        pytest.fail(f"{REF_ENV}={root} is at {head}, not {maker.COMMIT}")
    return maker.load_reference_scheduler(root)


def _tensor(values, shape=None, dtype=torch.float32) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    return t if shape is None else t.reshape(shape)


# -- the sampler against the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN["schedules"], ids=lambda c: f"{c['steps']}-{c['shift']}-rev{c['reverse']}")
def test_schedule_equals_the_references(case):
    sampler = FlowMatchDiscreteSampler(case["steps"], case["shift"], case["reverse"])
    assert sampler.sigmas.dtype == torch.float32 and len(sampler) == case["steps"]
    torch.testing.assert_close(sampler.sigmas, _tensor(case["sigmas"]), rtol=0, atol=0)
    torch.testing.assert_close(sampler.timesteps, _tensor(case["timesteps"]), rtol=0, atol=0)


def test_the_release_schedule_runs_from_noise_at_zero_to_data_at_one():
    """The reference's values themselves: t = 0 first (the DiT's input is pure noise), rising, ending at 1."""
    for case in GOLDEN["schedules"]:
        sigmas = _tensor(case["sigmas"])
        if case["reverse"]:
            assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas.diff() < 0).all())
        else:
            assert sigmas[0] == 0 and sigmas[-1] == 1 and bool((sigmas.diff() > 0).all())
            assert max(case["timesteps"]) < 1


@pytest.mark.parametrize("case", GOLDEN["euler"], ids=lambda c: f"{c['steps']}-{c['shift']}-rev{c['reverse']}")
def test_euler_steps_equal_the_references(case):
    shape = case["shape"]
    sampler = FlowMatchDiscreteSampler(case["steps"], case["shift"], case["reverse"])
    x = _tensor(case["sample"], shape, torch.bfloat16)
    for velocity, expected in zip(case["velocities"], case["outputs"]):
        x = sampler.step(_tensor(velocity, shape, torch.bfloat16), x)
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, _tensor(expected, shape), rtol=0, atol=0)


def test_step_at_a_given_index_and_out_of_range():
    sampler = FlowMatchDiscreteSampler(4, 3.0)
    x, v = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(sampler.step(v, x, index=2), (sampler.sigmas[3] - sampler.sigmas[2]).expand(3))
    assert sampler.index == 3
    sampler.step(v, x)
    with pytest.raises(IndexError, match="step index 4; this sampler has 4 steps"):
        sampler.step(v, x)


def test_live_reference_fixture_is_current(ref):
    """The committed golden JSON is what the reference computes now (same torch)."""
    live = _maker().reference_golden(ref)
    assert live["schedules"] == GOLDEN["schedules"]
    assert live["euler"] == GOLDEN["euler"]


@pytest.mark.parametrize("steps,shift,reverse", [(1, 13.0, False), (2, 7.0, False), (50, 13.0, False),
                                                 (15, 17.0, False), (37, 3.3, False), (50, 13.0, True),
                                                 (8, 0.5, False)])
def test_live_reference_schedule_and_loop(ref, steps, shift, reverse):
    """A whole denoising loop as the release's pipeline runs it (bf16 noise, bf16 DiT output, fp32 steps)
    with a velocity that depends on the sample and the timestep."""
    oracle = ref.FlowMatchDiscreteScheduler(reverse=reverse)
    oracle.set_timesteps(steps, time_shift=shift, device="cpu")
    ours = FlowMatchDiscreteSampler(steps, shift, reverse)
    torch.testing.assert_close(ours.sigmas, oracle.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(ours.timesteps, oracle.timesteps, rtol=0, atol=0)

    def field(x, t):
        return (0.3 * x.float() - torch.sin(5 * t) + t * x.float() ** 2 / 4).to(torch.bfloat16)

    x_ref = x_ours = torch.randn(1, 3, 4, 2, 2, generator=torch.Generator().manual_seed(steps)).to(torch.bfloat16)
    for t_ref, t_ours in zip(oracle.timesteps, ours.timesteps):
        x_ref = oracle.step(model_output=field(x_ref, t_ref), timestep=t_ref, sample=x_ref)
        x_ours = ours.step(field(x_ours, t_ours), x_ours)
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=0)


# -- the objective against the sampler ---------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("steps,shift", [(2, 13.0), (50, 13.0), (50, STEP_VIDEO_TURBO_SHIFT), (7, 1.0)])
def test_the_exact_velocity_takes_pure_noise_to_the_data(steps, shift, reverse):
    """The training target of one data point, fed to the sampler's Euler steps from pure noise, lands on
    that data point; on the way every sample is the training input at the step's timestep."""
    objective = FlowMatchDiscrete(FlowMatchDiscreteConfig(shift=shift, reverse=reverse))
    sampler = objective.sampler(steps)
    g = torch.Generator().manual_seed(steps)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    x = noise.clone()  # what a run starts from
    for t in sampler.timesteps:
        torch.testing.assert_close(x, objective.noisy(x0, noise, t.expand(2)), rtol=0, atol=2e-6)
        x = sampler.step(objective.target(x0, noise), x)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-6)
    # the opposite sign walks away from the data
    x = noise.clone()
    sampler = objective.sampler(steps)
    for _ in sampler.timesteps:
        x = sampler.step(-objective.target(x0, noise), x)
    assert (x - x0).abs().max() > 1


def test_training_input_and_target_identities():
    objective = FlowMatchDiscrete(FlowMatchDiscreteConfig())
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 3, 2, 5, generator=g), torch.randn(4, 3, 2, 5, generator=g)
    t = torch.tensor([0.0, 0.25, 0.9, 1.0])
    xt = objective.noisy(x0, noise, t)
    torch.testing.assert_close(xt[0], noise[0], rtol=0, atol=0)  # t = 0: pure noise, as the first step sees it
    torch.testing.assert_close(xt[3], x0[3], rtol=0, atol=0)
    torch.testing.assert_close(xt[1], 0.25 * x0[1] + 0.75 * noise[1])
    v = objective.target(x0, noise)
    torch.testing.assert_close(v, x0 - noise)
    w = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt + (1 - w) * v, x0)  # forward along the path to t = 1
    torch.testing.assert_close(xt - w * v, noise)  # back to t = 0
    torch.testing.assert_close(objective.timesteps(t), t)  # the DiT is given t in [0, 1]; it scales by 1000

    reverse = FlowMatchDiscrete(FlowMatchDiscreteConfig(reverse=True))
    xr = reverse.noisy(x0, noise, t)
    torch.testing.assert_close(xr[0], x0[0], rtol=0, atol=0)
    torch.testing.assert_close(xr[3], noise[3], rtol=0, atol=0)
    torch.testing.assert_close(reverse.target(x0, noise), noise - x0)

    bf16 = objective.noisy(x0.bfloat16(), noise, t)
    assert bf16.dtype == torch.bfloat16


def test_loss_is_the_mean_squared_error_and_preconditioning_is_on_the_data_estimate():
    g = torch.Generator().manual_seed(4)
    x0, noise, pred = (torch.randn(3, 4, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.8])
    plain = FlowMatchDiscrete(FlowMatchDiscreteConfig())
    target = plain.target(x0, noise)
    expected = ((pred - target) ** 2).sum() / pred.numel()
    torch.testing.assert_close(plain.loss(pred, target), expected)
    assert plain.loss(pred.bfloat16(), target).dtype == torch.float32

    for reverse in (False, True):
        pre = FlowMatchDiscrete(FlowMatchDiscreteConfig(precondition_outputs=True, reverse=reverse))
        xt = pre.noisy(x0, noise, t)
        end = 0.0 if reverse else 1.0
        x0_hat = xt + (end - t).view(-1, 1, 1, 1, 1) * pred  # the data estimate the velocity implies
        torch.testing.assert_close(pre.loss(pred, pre.target(x0, noise), t), ((x0_hat - x0) ** 2).mean())
        with pytest.raises(ValueError, match="precondition_outputs = true: the loss needs each sample's level"):
            pre.loss(pred, pre.target(x0, noise))


def test_levels_are_seeded_and_on_the_training_grid():
    objective = FlowMatchDiscrete(FlowMatchDiscreteConfig(num_train_timesteps=1000))
    a = objective.sample_levels(4096, torch.Generator().manual_seed(7))
    b = objective.sample_levels(4096, torch.Generator().manual_seed(7))
    c = objective.sample_levels(4096, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (4096,)
    k = a.double() * 1000
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    assert a.min() >= 0 and a.max() <= 0.999 + 1e-7
    # k = floor(N u): each of the N cells [k / N, (k + 1) / N) of u gives level k / N
    small = FlowMatchDiscrete(FlowMatchDiscreteConfig(num_train_timesteps=4, sample_method="uniform"))
    levels = small.sample_levels(40000, torch.Generator().manual_seed(0))
    for level in (0.0, 0.25, 0.5, 0.75):
        assert abs((levels == level).double().mean().item() - 0.25) < 0.01, level
    assert bool(((levels == 0) | (levels == 0.25) | (levels == 0.5) | (levels == 0.75)).all())


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.5, 0.5), (-1.0, 2.0)])
def test_logit_normal_levels(mean, std):
    """sigmoid(Normal(logit_mean, logit_std)) of the level (the DiT's timestep): positive means put the
    levels nearer the data end."""
    n = 1000
    objective = FlowMatchDiscrete(FlowMatchDiscreteConfig(num_train_timesteps=n, logit_mean=mean, logit_std=std))
    levels = objective.sample_levels(40000, torch.Generator().manual_seed(1)).double()
    z = torch.logit((levels + 0.5 / n).clamp(1e-6, 1 - 1e-6))  # the cell's centre
    assert abs(z.mean().item() - mean) < 0.03 + 0.02 * std
    assert abs(z.std().item() - std) < 0.03 + 0.02 * std
    # the normal CDF at the median
    median = 1 / (1 + math.exp(-mean))
    assert abs((levels < median).double().mean().item() - 0.5) < 0.015


def test_uniform_levels():
    objective = FlowMatchDiscrete(FlowMatchDiscreteConfig(sample_method="uniform"))
    levels = objective.sample_levels(40000, torch.Generator().manual_seed(2))
    counts = torch.histc(levels, bins=10, min=0, max=1) / levels.numel()
    assert bool(((counts - 0.1).abs() < 0.01).all()), counts


# -- configuration -----------------------------------------------------------------------------------------------

def test_defaults_are_the_releases():
    config = FlowMatchDiscreteConfig()
    assert (config.num_inference_timesteps, config.shift, config.reverse, config.solver) == (50, 13.0, False, "euler")
    assert STEP_VIDEO_TURBO_SHIFT == 17.0
    sampler = config.sampler()
    assert len(sampler) == 50 and sampler.timesteps[0] == 0
    turbo = config.sampler(steps=12, shift=STEP_VIDEO_TURBO_SHIFT)
    assert len(turbo) == 12 and turbo.sigmas[-1] == 1
    # the first step ends at 1 - k s / (1 + (k - 1) s), s = 11 / 12: (1 - s) / (1 + (k - 1) s)
    assert abs(turbo.sigmas[1].item() - (1 / 12) / (1 + 16 * 11 / 12)) < 1e-7


def test_mindspeed_json_sections_load():
    training = FlowMatchDiscreteConfig.from_json(MINDSPEED_TRAINING)
    assert (training.num_train_timesteps, training.shift, training.reverse, training.sample_method) == \
        (1000, 13.0, False, "logit_normal")
    FlowMatchDiscrete(training)
    inference = FlowMatchDiscreteConfig.from_json(MINDSPEED_INFERENCE)
    sampler = inference.sampler()
    reference = next(c for c in GOLDEN["schedules"] if (c["steps"], c["shift"], c["reverse"]) == (50, 13.0, False))
    torch.testing.assert_close(sampler.timesteps, _tensor(reference["timesteps"]), rtol=0, atol=0)
    # num_train_timesteps is the training grid only: the inference section's 1 cannot train
    with pytest.raises(ValueError, match=r"diffusion.num_train_timesteps = 1: .*valid for training: an integer >= 2"):
        FlowMatchDiscrete(inference)
    FlowMatchDiscreteConfig.from_json({"model_id": MODEL_ID, "sample_method": "uniform", "logit_mean": 0.5,
                                       "logit_std": 2, "precondition_outputs": True})


@pytest.mark.parametrize("section,message", [
    ({"shfit": 13.0}, r"diffusion: unknown key\(s\) shfit; valid: logit_mean, logit_std, model_id, "
                      r"num_inference_timesteps, num_train_timesteps, precondition_outputs, reverse, sample_method, "
                      r"shift, solver"),
    ({"guidance_scale": 9.0, "n_tokens": 3}, r"unknown key\(s\) guidance_scale, n_tokens; valid: "),
    ({"model_id": "wan_flow_match_scheduler"}, r"diffusion.model_id = 'wan_flow_match_scheduler'; valid: "
                                               r"flow_match_discrete_scheduler"),
    ({"solver": "heun"}, r"diffusion.solver = 'heun'; valid: euler"),
    ({"sample_method": "mode"}, r"diffusion.sample_method = 'mode'; valid: logit_normal, uniform"),
    ({"shift": 0}, r"diffusion.shift = 0; valid: a number > 0"),
    ({"shift": "13"}, r"diffusion.shift = '13'; valid: a number > 0"),
    ({"reverse": "false"}, r"diffusion.reverse = 'false'; valid: true, false"),
    ({"precondition_outputs": 1}, r"diffusion.precondition_outputs = 1; valid: true, false"),
    ({"num_inference_timesteps": 0}, r"diffusion.num_inference_timesteps = 0; valid: an integer >= 1"),
    ({"num_train_timesteps": 1000.0}, r"diffusion.num_train_timesteps = 1000.0; valid: an integer >= 1"),
    ({"logit_std": -1}, r"diffusion.logit_std = -1; valid: a number > 0"),
])
def test_bad_json_names_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        FlowMatchDiscreteConfig.from_json({"model_id": MODEL_ID, **section})


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="sampling steps = 0; valid: an integer >= 1"):
        FlowMatchDiscreteSampler(0, 13.0)
    with pytest.raises(ValueError, match="sampling shift = -2; valid: a number > 0"):
        FlowMatchDiscreteSampler(10, -2)


# -- guidance ----------------------------------------------------------------------------------------------------

def test_guidance_combines_a_cond_then_uncond_batch():
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 2, 3, 4, 4, generator=g), torch.randn(1, 2, 3, 4, 4, generator=g)
    out = guided_velocity(torch.cat([cond, uncond]), 9.0)
    torch.testing.assert_close(out, uncond + 9.0 * (cond - uncond))
    assert not torch.allclose(guided_velocity(torch.cat([uncond, cond]), 9.0), out)
    assert guided_velocity(torch.cat([cond, uncond]).bfloat16(), 5.0).dtype == torch.bfloat16
    torch.testing.assert_close(guided_velocity(torch.cat([cond, uncond]), 1.0), cond)
    assert guidance_enabled(9.0) and guidance_enabled(5.0) and not guidance_enabled(1.0)
    with pytest.raises(ValueError, match="a batch of 3; expected \\[cond; uncond\\] halves"):
        guided_velocity(torch.zeros(3, 2), 9.0)
