"""Open-Sora-Plan v1.3 sampling (``mm.families.opensoraplan.sampler.denoise``) against the reference's
pipeline loop written on diffusers' schedulers (the reference's own choice): the same latents for the
same DiT, prompt embeddings, seed and scheduler, with and without classifier-free guidance; and
CFG-parallel on two gloo ranks against one process."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.parallel.test_opensoraplan_dit import TINY, _config, _model

STEPS, LATENT, TEXT_LEN = 4, (3, 4, 8), 5
DIFFUSERS_SCHEDULERS = {"EulerAncestralDiscrete": "EulerAncestralDiscreteScheduler",
                        "EulerDiscrete": "EulerDiscreteScheduler", "DDIM": "DDIMScheduler", "DDPM": "DDPMScheduler"}


def _section(method: str, guidance: float) -> dict:
    return {"model_id": method, "num_inference_steps": STEPS, "guidance_scale": guidance,
            "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def _inputs(osp):
    g = torch.Generator().manual_seed(3)
    context = torch.randn(2, TEXT_LEN, osp.caption_channels, generator=g)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.int64)
    mask[0, 3:] = 0  # the negative prompt is shorter
    return context, mask


def _reference_loop(dit, osp, method: str, guidance: float):
    """OpenSoraPipeline.__call__'s loop (pipeline_opensora.py at 4b14d58) on diffusers' scheduler."""
    import diffusers

    from mm.diffusion.ddpm_samplers import DDPMSamplerConfig

    cfg = DDPMSamplerConfig.from_json(_section(method, guidance))
    extra = {"clip_sample": False} if method in ("DDIM", "DDPM") else {}
    scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[method])(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", **extra)
    scheduler.set_timesteps(STEPS)
    context, mask = _inputs(osp)
    g = torch.Generator().manual_seed(42)  # the initial latents and the ancestral noise, as prepare_latents
    latents = torch.randn(1, osp.out_dim, *LATENT, generator=g) * scheduler.init_noise_sigma
    guided = cfg.do_classifier_free_guidance
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t)
        ctx, m = (context, mask) if guided else (context[1:], mask[1:])
        out = dit(x, t.expand(x.shape[0]), ctx, m)
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents, generator=g).prev_sample
    return latents


def _worker(rank, world, method, guidance, cfg_parallel):
    from mm.diffusion.ddpm_samplers import DDPMSamplerConfig
    from mm.families.opensoraplan.sampler import denoise
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world), seed=0)
    torch.manual_seed(0)
    osp = _config(TINY)
    dit = _model(osp, dtype=torch.float32).eval()
    context, mask = _inputs(osp)
    g = torch.Generator().manual_seed(42)
    noise = torch.randn(1, osp.out_dim, *LATENT, generator=g)
    cfg = DDPMSamplerConfig.from_json(_section(method, guidance))
    guided = cfg.do_classifier_free_guidance
    group = torch.distributed.new_group([0, 1]) if cfg_parallel else None
    latents = denoise(dit, context[1:], mask[1:], context[:1] if guided else None, mask[:1] if guided else None,
                      noise, cfg, torch.float32, generator=g, cfg_group=group)
    reference = _reference_loop(dit, osp, method, guidance) if rank == 0 else None
    destroy_parallel()
    return latents, reference


@pytest.mark.parametrize("method, guidance", [("EulerAncestralDiscrete", 7.5), ("EulerDiscrete", 1.0), ("DDPM", 4.0)])
def test_denoise_equals_the_reference_pipeline_loop(method, guidance):
    (latents, reference), = run_distributed(1, _worker, method, guidance, False)
    scale = reference.abs().max().item()
    assert (latents - reference).abs().max().item() <= 1e-4 * max(1.0, scale)
    assert not torch.allclose(latents, torch.zeros_like(latents))


def test_cfg_parallel_equals_one_process():
    (one, _), = run_distributed(1, _worker, "EulerAncestralDiscrete", 7.5, False)
    results = run_distributed(2, _worker, "EulerAncestralDiscrete", 7.5, True)
    for latents, _ in results:
        assert torch.allclose(latents, one, rtol=0, atol=1e-5 * max(1.0, one.abs().max().item()))
