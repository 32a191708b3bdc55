"""Open-Sora-Plan v1.3 sampling (T2V ``videoditsparse``, I2V ``videoditsparsei2v``): the reference's
pipeline loop on mm's DDPM-family samplers (``mm.diffusion.ddpm_samplers``).

Per step, as the reference's ``OpenSoraPipeline`` / ``OpenSoraInpaintPipeline`` do it: the latents
(doubled for classifier-free guidance: negative prompt, prompt) are scaled by
``scale_model_input``; an I2V model also reads the masked-video latents and the mask after them on
channels; the DiT sees the sampler's timestep, the caption embeddings and the caption mask;
``uncond + guidance_scale (cond - uncond)`` (optionally rescaled, ``guidance_rescale``); then the
sampler's step, drawing any fresh noise (Euler ancestral, DDPM) from the prompt's generator. The
initial latents are ``randn * init_noise_sigma``.

The sampler, its steps and the guidance scale are the inference model JSON's ``diffusion`` section
(``DDPMSamplerConfig``, MindSpeed-MM's keys: ``model_id`` "EulerAncestralDiscrete",
``num_inference_steps``, ``guidance_scale``, ``prediction_type``, ``rescale_betas_zero_snr``,
``timestep_spacing``...).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mm.diffusion.ddpm_samplers import DDPMSamplerConfig, build_ddpm_sampler, classifier_free_guidance


def sampler_config(diffusion) -> DDPMSamplerConfig:
    """The model JSON's ``diffusion`` section (a ComponentConfig or None) as the sampler's config."""
    section = {} if diffusion is None else {"model_id": diffusion.model_id, **diffusion.params}
    return DDPMSamplerConfig.from_json(section)


@torch.no_grad()
def denoise(dit, context: torch.Tensor, context_mask: torch.Tensor, negative: torch.Tensor | None,
            negative_mask: torch.Tensor | None, noise: torch.Tensor, config: DDPMSamplerConfig, dtype: torch.dtype,
            generator: torch.Generator, show_progress: bool = False, cfg_group=None, cond=None,
            condition: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
    """fp32 latents ``[1, c, f, h, w]`` from ``noise`` (standard normal, scaled here by the sampler's
    ``init_noise_sigma``). ``context [1, L, d]`` / ``context_mask [1, L]``: the prompt;
    ``negative`` / ``negative_mask``: the negative prompt (None: guidance off). ``cfg_group``: a pair
    of ranks (--cfg-parallel), the first running the conditional branch, the second the
    unconditional one, exchanging their outputs each step. ``cond``/``condition``: the I2V model's
    conditioning and its encoded masked video + mask, the same for both branches. ``generator``
    draws the noise of stochastic samplers (the same on every rank)."""
    sampler = build_ddpm_sampler(config)
    latents = noise.float() * sampler.init_noise_sigma
    branch = None if cfg_group is None else torch.distributed.get_rank(cfg_group)

    def predict(x, ctx, mask, t):
        if cond is not None:
            x = cond.model_input(x, t, condition)[0]
        return dit(x.to(dtype), t, ctx, mask).float()

    for t in tqdm(sampler.timesteps, desc="denoising", disable=not show_progress, leave=False):
        model_input = sampler.scale_model_input(latents)
        timestep = t.expand(latents.shape[0]).to(latents.device)
        if negative is None:
            out = predict(model_input, context, context_mask, timestep)
        else:
            if branch is None:
                both = [predict(model_input, negative, negative_mask, timestep),
                        predict(model_input, context, context_mask, timestep)]
            else:
                mine = predict(model_input, context if branch == 0 else negative,
                               context_mask if branch == 0 else negative_mask, timestep)
                pair = [torch.empty_like(mine) for _ in range(2)]
                torch.distributed.all_gather(pair, mine, group=cfg_group)
                both = pair[::-1]  # (unconditional, conditional)
            out = classifier_free_guidance(*both, config.guidance_scale, config.guidance_rescale)
        latents = sampler.step(out, latents, generator=generator)
        if on_step is not None:
            on_step()
    return latents
