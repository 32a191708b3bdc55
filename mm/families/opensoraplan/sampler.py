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

from mm.data.images import load_condition_frames
from mm.diffusion.ddpm_samplers import DDPMSamplerConfig, build_ddpm_sampler, classifier_free_guidance
from mm.families.spec import Texts


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


# keys of the inference section that are Wan's flow-matching settings, and where Open-Sora-Plan sets them
_NOT_OSP_KEYS = {"sample_steps": "diffusion.num_inference_steps", "num_inference_steps": "diffusion.num_inference_steps",
                 "sample_shift": None, "flow_shift": None, "sample_solver": "diffusion.model_id",
                 "guidance_scale": "diffusion.guidance_scale", "sample_guide_scale": "diffusion.guidance_scale",
                 "low_noise_model": None, "boundary_ratio": None, "ref_images": None}


class OpenSoraPlanSampler:
    """Open-Sora-Plan's part of a sampling run: the sampler of the model JSON's ``diffusion``
    section, the caption mask, and for I2V the masked-video + mask condition (first frame given)."""

    text_zero_padding = False  # the DiT masks padded caption tokens itself

    @staticmethod
    def check(config, arch, section: dict) -> list[str]:
        """Its sampler is the ``diffusion`` section, so the flow-matching keys of the inference
        section do not apply."""
        problems = [f"inference.{key} is not an Open-Sora-Plan sampling key" + (f": set {where}" if where else "")
                    for key, where in _NOT_OSP_KEYS.items() if key in section]
        try:
            sampler_config(config.model.diffusion)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        return problems

    @staticmethod
    def check_sampling(config, arch, sampling, temporal: int) -> list[str]:
        model_id = config.model.predictor.model_id
        if sampling.task not in ("t2v", "i2v"):
            return [f"inference.task = {sampling.task!r} with predictor {model_id!r}; valid: t2v, i2v"]
        if (sampling.task == "i2v") != arch.is_i2v:
            return [f"inference.task = {sampling.task!r} with predictor {model_id!r}: "
                    + ("the I2V DiT needs inference.conditional_pixel_values_path (task i2v)" if arch.is_i2v
                       else "the T2V DiT samples task t2v (leave conditional_pixel_values_path out)")]
        return []

    @staticmethod
    def guided(config, sampling) -> bool:
        return sampler_config(config.model.diffusion).do_classifier_free_guidance

    def __init__(self, config, arch, sampling, home: torch.device):
        self.sampling = sampling
        self.config = sampler_config(config.model.diffusion)
        self.steps, self.solver = self.config.num_inference_steps, self.config.model_id
        self.image_encoder = None
        self.cond = None
        if arch.is_i2v:
            from mm.models.predictor.opensoraplan.conditioning import OpenSoraPlanConditioning

            self.cond = OpenSoraPlanConditioning.from_config(arch, None)

    def prepare(self, index: int, vae, vae_cp, device, dtype) -> dict:
        if self.cond is None:
            return {"condition": None}
        sampling = self.sampling
        frames = load_condition_frames([sampling.images[index]], sampling.height, sampling.width,
                                       sampling.crop_images).to(device)
        return {"condition": self.cond.encode_images(vae, frames, sampling.num_frames, vae_cp=vae_cp).to(dtype)}

    def noise_frames(self, latent_frames: int, prepared: dict) -> int:
        return latent_frames

    def denoise(self, dits, texts: Texts, noise: torch.Tensor, generator: torch.Generator, prepared: dict,
                dtype: torch.dtype, show_progress: bool, cfg_group, on_step) -> torch.Tensor:
        context, mask = texts.embeddings[0], texts.masks[0]
        guided = context.shape[0] > 1
        return denoise(dits[0], context[:1], mask[:1], context[1:] if guided else None, mask[1:] if guided else None,
                       noise, self.config, dtype, generator=generator, show_progress=show_progress,
                       cfg_group=cfg_group, cond=self.cond, condition=prepared["condition"], on_step=on_step)
