"""OpenSoraPlan v1.3's objective (mm.diffusion.ddpm) and samplers (mm.diffusion.ddpm_samplers) against
diffusers' DDPMScheduler / EulerAncestralDiscreteScheduler / EulerDiscreteScheduler / DDIMScheduler, the
schedulers the reference (Open-Sora-Plan 4b14d58) trains and samples with, configured as it configures
them. The loss is checked against the reference's formula written out on diffusers' ``add_noise``,
``get_velocity`` and ``compute_snr``."""

from __future__ import annotations

import pytest
import torch

from mm.diffusion.ddpm import DDPM, DDPMConfig, NoiseSchedule
from mm.diffusion.ddpm_samplers import DDPMSamplerConfig, build_ddpm_sampler, classifier_free_guidance

diffusers = pytest.importorskip("diffusers")

# the diffusion sections of MindSpeed-MM's pretrain_t2v_model.json and inference_t2v_model.json
TRAIN_JSON = {"model_id": "DDPM", "num_train_steps": 1000, "guidance_scale": 7.5, "prediction_type": "v_prediction",
              "rescale_betas_zero_snr": True, "timestep_spacing": "leading", "device": "npu", "snr_gamma": 5.0,
              "t_sample_method": "explicit_uniform"}
INFER_JSON = {"model_id": "EulerAncestralDiscrete", "num_inference_steps": 100, "guidance_scale": 7.5,
              "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "device": "npu",
              "timestep_spacing": "trailing"}


def _oracle_ddpm(cfg: DDPMConfig):
    s = cfg.schedule
    return diffusers.DDPMScheduler(num_train_timesteps=s.num_train_steps, beta_start=s.beta_start,
                                   beta_end=s.beta_end, beta_schedule=s.beta_schedule,
                                   rescale_betas_zero_snr=s.rescale_betas_zero_snr,
                                   prediction_type=cfg.prediction_type)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_matches_diffusers(beta_schedule, zero_snr):
    s = NoiseSchedule(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr, beta_start=0.00085,
                      beta_end=0.012)
    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr,
                                  beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(s.betas(), ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(s.alphas_cumprod(), ref.alphas_cumprod, rtol=0, atol=0)
    if zero_snr:
        assert s.alphas_cumprod()[-1] == 0


def _reference_loss(sched, model_pred, x0, noise, timesteps, mask, snr_gamma, prediction_type):
    """Open-Sora-Plan's train_t2v_diffusers.py loss (v1.3), written on diffusers' scheduler."""
    from diffusers.training_utils import compute_snr

    target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, timesteps)
    b, c = model_pred.shape[:2]
    if mask is not None:
        mask = mask.unsqueeze(1).repeat(1, c, 1, 1, 1).float().reshape(b, -1)
    loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="none").reshape(b, -1)
    if snr_gamma is None:
        return (loss * mask).sum() / mask.sum() if mask is not None else loss.mean()
    snr = compute_snr(sched, timesteps)
    w = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    w = (w / snr if prediction_type == "epsilon" else w / (snr + 1)).reshape(b, 1)
    return (loss * mask * w).sum() / mask.sum() if mask is not None else (loss * w).mean()


@pytest.mark.parametrize("prediction_type,zero_snr,snr_gamma",
                         [("v_prediction", True, 5.0), ("v_prediction", True, None), ("v_prediction", False, 1.0),
                          ("epsilon", False, 5.0), ("epsilon", True, None)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_objective_matches_reference(prediction_type, zero_snr, snr_gamma, masked, dtype):
    cfg = DDPMConfig(schedule=NoiseSchedule(rescale_betas_zero_snr=zero_snr), prediction_type=prediction_type,
                     snr_gamma=snr_gamma)
    ddpm, ref = DDPM(cfg), _oracle_ddpm(cfg)
    g = torch.Generator().manual_seed(3)
    shape = (4, 3, 3, 4, 6)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.tensor([0, 421, 998, 999])  # both ends: SNR ~ 1e4 and 0 (zero terminal SNR)
    torch.testing.assert_close(ddpm.noisy(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=0)
    target = ddpm.target(x0, noise, t)
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(target, expected, rtol=0, atol=0)

    pred = target + 0.3 * torch.randn(shape, generator=g, dtype=dtype)
    mask = None
    if masked:  # sample 1 padded in time, sample 2 in height, sample 3 real everywhere but one latent
        mask = torch.ones(4, 3, 4, 6)
        mask[1, 2:] = 0
        mask[2, :, 3:] = 0
        mask[3, 0, 0, 0] = 0
    got = ddpm.loss(pred, target, t, mask)
    want = _reference_loss(ref, pred, x0, noise, t, mask, snr_gamma, prediction_type)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)


def test_min_snr_weights_and_zero_snr_end():
    ddpm = DDPM(DDPMConfig.from_json(TRAIN_JSON))
    w = ddpm.loss_weights(torch.tensor([0, 500, 999]))
    snr = ddpm.snr(torch.tensor([0, 500, 999]))
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert w[2] == 0  # the pure-noise step (v = -x0) carries no weight under min-SNR


def test_timesteps_random_and_explicit_uniform():
    g = torch.Generator().manual_seed(0)
    rand = DDPM(DDPMConfig())
    t = rand.sample_timesteps(4096, generator=g)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and t.unique().numel() > 950

    ddpm = DDPM(DDPMConfig.from_json(TRAIN_JSON))
    seen = []
    for world in (1, 3, 8, 1000, 1500):
        for rank in sorted({0, min(1, world - 1), world // 2, world - 1}):
            t = ddpm.sample_timesteps(2000, generator=g, rank=rank, world_size=world)
            width = 1000 / world
            # the reference's round(uniform(width * rank - 0.5, width * (rank + 1) - 0.5))
            lo, hi = max(0, round(width * rank - 0.5 + 1e-9)), round(width * (rank + 1) - 0.5 - 1e-9)
            assert lo <= int(t.min()) and int(t.max()) <= hi, (world, rank, t.min(), t.max())
            if world == 8:
                seen.append(t)
    assert set(torch.cat(seen).tolist()) >= set(range(0, 125)) | set(range(875, 1000))
    with pytest.raises(ValueError, match="rank 4 of world_size 4"):
        ddpm.sample_timesteps(1, rank=4, world_size=4)


def test_noise_offset_is_the_references_draw():
    ddpm = DDPM(DDPMConfig(noise_offset=0.1))
    shape = (2, 4, 3, 5, 5)
    got = ddpm.sample_noise(shape, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    want = torch.randn(shape, generator=g)
    want = want + 0.1 * torch.randn((2, 4, 1, 1, 1), generator=g)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = DDPM(DDPMConfig()).sample_noise(shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(plain, torch.randn(shape, generator=torch.Generator().manual_seed(7)))


def _oracle_sampler(cfg: DDPMSamplerConfig):
    """diffusers' scheduler as the reference's opensora/utils/sample_utils.py get_scheduler builds it."""
    s = cfg.schedule
    kwargs = dict(num_train_timesteps=s.num_train_steps, beta_start=s.beta_start, beta_end=s.beta_end,
                  beta_schedule=s.beta_schedule, rescale_betas_zero_snr=s.rescale_betas_zero_snr,
                  prediction_type=cfg.prediction_type, timestep_spacing=cfg.spacing, steps_offset=cfg.steps_offset)
    if cfg.model_id in ("DDIM", "DDPM"):
        kwargs.update(clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range)
    if cfg.model_id == "DDIM":
        kwargs.update(set_alpha_to_one=cfg.set_alpha_to_one)
    cls = {"EulerAncestralDiscrete": diffusers.EulerAncestralDiscreteScheduler,
           "EulerDiscrete": diffusers.EulerDiscreteScheduler,
           "DDIM": diffusers.DDIMScheduler, "DDPM": diffusers.DDPMScheduler}[cfg.model_id]
    sched = cls(**kwargs)
    sched.set_timesteps(cfg.num_inference_steps)
    return sched


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for the DiT on a [2b, c, f, h, w] batch (uncond, cond): output depends on the
    input, the timestep and the half of the batch (the 'prompt')."""
    tt = t.float() / 1000
    ramp = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
    prompt = torch.arange(x.shape[0], dtype=x.dtype).reshape(-1, 1, 1, 1, 1) / x.shape[0]
    return 0.6 * x + torch.sin(3 * tt) * ramp + 0.5 * prompt * torch.cos(x) - 0.2 * tt * x ** 2 / (1 + x ** 2)


def _loops(cfg: DDPMSamplerConfig, seed: int = 11):
    """The reference pipeline's denoising loop (pipeline_opensora.py) on diffusers' scheduler and the
    same loop on ours: initial noise times init_noise_sigma, CFG over a doubled batch, step with noise
    from the same generator. Returns both trajectories."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    shape = (2, 3, 2, 4, 5)
    ref, ours = _oracle_sampler(cfg), build_ddpm_sampler(cfg)
    torch.testing.assert_close(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype), rtol=0, atol=0)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    g_ref, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x_ref = torch.randn(shape, generator=g_ref) * ref.init_noise_sigma
    x_ours = torch.randn(shape, generator=g_ours) * ours.init_noise_sigma
    out_ref, out_ours = [], []
    step_kwargs = {"eta": cfg.eta} if cfg.model_id == "DDIM" else {}  # the pipeline's extra_step_kwargs
    for t in ref.timesteps:
        inp = ref.scale_model_input(torch.cat([x_ref] * 2), t)
        uncond, cond = _model(inp, t).chunk(2)
        pred = uncond + cfg.guidance_scale * (cond - uncond)
        if cfg.guidance_rescale > 0:
            pred = rescale_noise_cfg(pred, cond, guidance_rescale=cfg.guidance_rescale)
        x_ref = ref.step(pred, t, x_ref, generator=g_ref, return_dict=False, **step_kwargs)[0]
        out_ref.append(x_ref)
    for t in ours.timesteps:
        inp = ours.scale_model_input(torch.cat([x_ours] * 2))
        uncond, cond = _model(inp, t).chunk(2)
        x_ours = ours.step(classifier_free_guidance(uncond, cond, cfg.guidance_scale, cfg.guidance_rescale),
                           x_ours, generator=g_ours)
        out_ours.append(x_ours)
    return out_ref, out_ours


def _assert_trajectories(out_ref, out_ours):
    assert len(out_ref) == len(out_ours)
    for i, (a, b) in enumerate(zip(out_ref, out_ours)):
        scale = max(1.0, float(a.abs().max()))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6 * scale, msg=lambda m: f"step {i}: {m}")


SAMPLER_CASES = [
    # v1.3's inference: Euler ancestral, v-prediction, zero terminal SNR, trailing spacing
    dict(INFER_JSON, num_inference_steps=12),
    dict(INFER_JSON, num_inference_steps=12, guidance_rescale=0.7),
    dict(INFER_JSON, num_inference_steps=7, timestep_spacing="linspace"),
    dict(model_id="EulerAncestralDiscrete", num_inference_steps=10, prediction_type="epsilon"),  # leading
    dict(INFER_JSON, model_id="EulerDiscrete", num_inference_steps=12),
    dict(model_id="EulerDiscrete", num_inference_steps=9, prediction_type="epsilon", steps_offset=1,
         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(INFER_JSON, model_id="DDIM", num_inference_steps=12),
    dict(INFER_JSON, model_id="DDIM", num_inference_steps=7, eta=0.5, guidance_rescale=0.3),
    dict(model_id="DDIM", num_inference_steps=10, prediction_type="epsilon", set_alpha_to_one=False,
         timestep_spacing="linspace"),
    dict(INFER_JSON, model_id="DDPM", num_inference_steps=12),
    dict(model_id="DDPM", num_inference_steps=8, prediction_type="epsilon", clip_sample=True,
         clip_sample_range=2.0, guidance_scale=1.0),
    dict(INFER_JSON, model_id="DDPM", num_inference_steps=7, timestep_spacing="leading", guidance_scale=3.0),
]


@pytest.mark.parametrize("section", SAMPLER_CASES, ids=lambda s: f"{s['model_id']}-{s.get('num_inference_steps')}")
def test_sampler_loop_matches_diffusers(section):
    _assert_trajectories(*_loops(DDPMSamplerConfig.from_json(section)))


def test_v13_sampler_config_and_first_sigma():
    cfg = DDPMSamplerConfig.from_json(INFER_JSON)
    sampler = build_ddpm_sampler(cfg)
    assert cfg.do_classifier_free_guidance and cfg.spacing == "trailing" and len(sampler) == 100
    assert sampler.timesteps[0] == 999 and sampler.timesteps[-1] == 9
    assert sampler.init_noise_sigma == pytest.approx(4096.0, rel=1e-6)  # sqrt((1 - 2^-24) / 2^-24)
    # no timestep_spacing key: the reference's choice from rescale_betas_zero_snr
    assert DDPMSamplerConfig.from_json({k: v for k, v in INFER_JSON.items() if k != "timestep_spacing"}).spacing \
        == "trailing"
    assert DDPMSamplerConfig.from_json({"model_id": "DDIM"}).spacing == "leading"


def test_sampler_on_the_accelerator_dtype_keeps_the_sample_dtype():
    cfg = DDPMSamplerConfig.from_json(dict(INFER_JSON, num_inference_steps=3))
    sampler = build_ddpm_sampler(cfg)
    x = torch.randn(1, 2, 1, 2, 2, dtype=torch.bfloat16) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        x = sampler.step(_model(sampler.scale_model_input(x), t), x, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()


@pytest.mark.parametrize("section,match", [
    ({"model_id": "DDPM", "snr_gama": 5.0}, r"unknown key\(s\) snr_gama; valid: .*snr_gamma"),
    ({"model_id": "EulerAncestralDiscrete"}, "model_id = 'EulerAncestralDiscrete'; valid for training: DDPM"),
    ({"prediction_type": "sample"}, "prediction_type = 'sample'; valid: epsilon, v_prediction"),
    ({"beta_schedule": "cosine"}, "beta_schedule = 'cosine'; valid: linear, scaled_linear, squaredcos_cap_v2"),
    ({"t_sample_method": "uniform"}, "t_sample_method = 'uniform'; valid: random, explicit_uniform"),
    ({"snr_gamma": 5.0, "rescale_betas_zero_snr": True}, "epsilon weight .* undefined at zero SNR"),
    ({"snr_gamma": 0}, "snr_gamma = 0; valid"),
    ({"num_train_steps": 1000, "num_train_timesteps": 500}, "give one of them"),
])
def test_training_config_errors(section, match):
    with pytest.raises(ValueError, match=match):
        DDPMConfig.from_json(section)


@pytest.mark.parametrize("section,match", [
    ({"model_id": "PNDM"}, "model_id = 'PNDM' .*not implemented here.*valid: EulerAncestralDiscrete"),
    ({"model_id": "Euler"}, "model_id = 'Euler'; valid: EulerAncestralDiscrete, EulerDiscrete, DDIM, DDPM"),
    ({"model_id": "DDIM", "timestep_spacing": "even"}, "timestep_spacing = 'even'; valid: linspace, leading"),
    ({"model_id": "DDIM", "num_inference_steps": 0}, r"num_inference_steps = 0; valid: 1 .. num_train_steps"),
    ({"model_id": "DDIM", "guidance_rescale": 1.5}, "guidance_rescale = 1.5; valid: 0 .. 1"),
    ({"model_id": "DDIM", "snr_gamma": 5.0}, r"unknown key\(s\) snr_gamma"),
])
def test_sampler_config_errors(section, match):
    with pytest.raises(ValueError, match=match):
        DDPMSamplerConfig.from_json(section)


def test_training_json_of_the_seed_parses():
    cfg = DDPMConfig.from_json(TRAIN_JSON)
    assert cfg.prediction_type == "v_prediction" and cfg.snr_gamma == 5.0
    assert cfg.schedule.rescale_betas_zero_snr and cfg.t_sample_method == "explicit_uniform"
