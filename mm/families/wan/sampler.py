"""Wan's sampling (``inference.py`` with a ``wan_dit`` predictor): text-to-video and image-to-video
(Wan2.1 I2V, FLF2V; Wan2.2 I2V-A14B's channel-concatenated condition; Wan2.2 TI2V-5B's first latent
frame, clean at timestep 0 on every step; Phantom subject-to-video on a Wan2.1 T2V DiT,
``mm.families.wan.subject``) with the flow-matching samplers of ``mm.diffusion.samplers`` and
classifier-free guidance; Wan2.2 A14B's low-noise expert takes over below ``boundary_ratio``."""

from __future__ import annotations

import torch
from tqdm import tqdm

from mm.data.images import load_condition_frames
from mm.diffusion.samplers import build_sampler
from mm.families.spec import Texts
from mm.families.wan.subject import load_reference_images, reference_latents
from mm.models.image_encoder.clip import check_num_heads
from mm.models.predictor.wan.conditioning import WanConditioning


def conditioning_task(task: str) -> str:
    """The WanConditioning a sampling task uses: Phantom's s2v runs a text-to-video DiT."""
    return "t2v" if task == "s2v" else task


@torch.no_grad()
def denoise(dit, context: torch.Tensor, negative: torch.Tensor | None, noise: torch.Tensor, sampling,
            dtype: torch.dtype, show_progress: bool, cfg_group=None, cond: WanConditioning | None = None,
            condition: torch.Tensor | None = None, context_image: torch.Tensor | None = None,
            low_noise_dit=None, references: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
    """The sampler's loop with classifier-free guidance (``negative`` None: guidance off); fp32 latents.

    ``sampling``: the run's ``SamplingConfig``. ``cfg_group``: a pair of ranks (--cfg-parallel) of
    which the first runs the conditional branch and the second the unconditional one; they swap
    their velocities each step and both combine them as one rank would. ``cond``/``condition``/
    ``context_image``: an image-conditioned model's conditioning (WanConditioning, its encoded
    condition, the CLIP tokens), the same for both branches. ``low_noise_dit``: Wan2.2 A14B's second
    expert, which takes over (with ``guidance_scale_2``) below ``boundary_ratio`` x 1000.
    ``references [1, z, N, h, w]``: Phantom's reference latents after the video frames, with its
    three-branch guidance (``mm.families.wan.subject``; ``negative`` is then required).
    ``on_step``: called after every step."""
    sampler = build_sampler(sampling.sample_solver, sampling.sample_steps, sampling.sample_shift)
    latents = noise.float()
    branch = None if cfg_group is None else torch.distributed.get_rank(cfg_group)
    boundary = None if low_noise_dit is None else sampling.boundary_ratio * 1000
    refs = None if references is None else references.to(latents.device, latents.dtype)
    if refs is not None and (negative is None or cfg_group is not None):
        raise ValueError("Phantom references: three guidance branches on one rank need the negative prompt")
    for t in tqdm(sampler.timesteps, desc="denoising", disable=not show_progress, leave=False):
        timestep = t.float().expand(latents.shape[0]).to(latents.device)
        high_noise = boundary is None or t >= boundary
        model = dit if high_noise else low_noise_dit
        scale = sampling.guidance_scale if high_noise or sampling.guidance_scale_2 is None else \
            sampling.guidance_scale_2

        # i2v/flf2v: the condition channels after the latents; ti2v: latent frame 0 the clean image
        # latent, with timestep 0 on its tokens
        model_latents, model_timestep = (latents, timestep) if cond is None else \
            cond.model_input(latents, timestep, condition)

        def velocity_for(ctx, x=model_latents):
            out = model(latents=x.to(dtype), timestep=model_timestep, context=ctx, context_image=context_image)
            return out[:, :, :latents.shape[2]].float()  # the video frames (Phantom: not the references')

        if refs is not None:
            with_refs = torch.cat([model_latents, refs], dim=2)
            text, image = velocity_for(context, with_refs), velocity_for(negative, with_refs)
            neither = velocity_for(negative, torch.cat([model_latents, torch.zeros_like(refs)], dim=2))
            velocity = neither + sampling.guidance_scale_img * (image - neither) + \
                sampling.guidance_scale_text * (text - image)
        elif negative is None:
            velocity = velocity_for(context)
        else:
            if branch is None:
                conditional, unconditional = velocity_for(context), velocity_for(negative)
            else:
                mine = velocity_for(context if branch == 0 else negative)
                both = [torch.empty_like(mine) for _ in range(2)]
                torch.distributed.all_gather(both, mine, group=cfg_group)
                conditional, unconditional = both
            velocity = unconditional + scale * (conditional - unconditional)
        latents = sampler.step(velocity, latents)
        if on_step is not None:
            on_step()
    if cond is not None and cond.kind == "ti2v":  # the sampler also moved frame 0; the image is its value
        latents = cond.model_input(latents, timestep, condition)[0]
    return latents


class WanSampler:
    """Wan's part of a sampling run: the image conditioning (and its CLIP encoder), Phantom's
    references, and the flow-matching loop."""

    text_zero_padding = True  # Wan's DiT reads exact zeros past each prompt

    @staticmethod
    def check(config, arch, section: dict) -> list[str]:
        return []

    @staticmethod
    def check_sampling(config, arch, sampling, temporal: int) -> list[str]:
        problems = []
        try:
            cond = WanConditioning.from_config(arch, conditioning_task(sampling.task))
        except ValueError as e:
            return [f"inference.task = {sampling.task!r} with predictor (in_dim {arch.in_dim}, image_dim "
                    f"{arch.image_dim}): {e}"]
        if cond.kind == "ti2v" and (sampling.num_frames - 1) // temporal < 1:
            problems.append(f"inference.num_frames = {sampling.num_frames} with task 'i2v' on a TI2V model "
                            f"(predictor.in_dim = out_dim = {arch.in_dim}): the first latent frame is the "
                            f"image, so at least {temporal + 1} frames are needed")
        if cond.uses_clip and not (config.model.image_encoder and config.model.image_encoder.from_pretrained):
            problems.append("predictor.image_dim is set (a CLIP image branch): the model JSON needs "
                            "image_encoder.from_pretrained (a CLIP vision model directory, or Wan's release "
                            "file models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")
        if cond.uses_clip and config.model.image_encoder is not None:
            problems += check_num_heads(config.model.image_encoder.params.get("num_heads"))
        if sampling.task == "s2v" and config.args.cfg_parallel:
            problems.append("--cfg-parallel splits two guidance branches over a pair of ranks; Phantom's s2v guidance "
                            "has three (text, image, neither): leave --cfg-parallel out")
        return problems

    @staticmethod
    def guided(config, sampling) -> bool:
        """A scale other than 1 for either expert (Wan2.2 A14B's low-noise expert has its own,
        ``guidance_scale_2``), or Phantom's three branches."""
        second = sampling.guidance_scale_2
        return sampling.guidance_scale != 1.0 or (second is not None and second != 1.0) or sampling.task == "s2v"

    def __init__(self, config, arch, sampling, home: torch.device):
        self.sampling = sampling
        self.cond = WanConditioning.from_config(arch, conditioning_task(sampling.task))
        self.steps, self.solver = sampling.sample_steps, sampling.sample_solver
        self.image_encoder = None
        if self.cond.uses_clip:
            from mm.models.image_encoder import ClipImageEncoder

            self.image_encoder = ClipImageEncoder.from_section(config.model.image_encoder).to(home)

    def prepare(self, index: int, vae, vae_cp, device, dtype) -> dict:
        sampling, prepared = self.sampling, {"condition": None, "context_image": None, "references": None}
        if self.cond.kind != "none":
            paths = [sampling.images[index]] + ([sampling.last_images[index]] if sampling.task == "flf2v" else [])
            frames = load_condition_frames(paths, sampling.height, sampling.width, sampling.crop_images).to(device)
            prepared["condition"] = self.cond.encode(vae, frames, sampling.num_frames, vae_cp=vae_cp)
            if self.image_encoder is not None:
                prepared["context_image"] = self.cond.encode_image(self.image_encoder, frames).to(dtype)
        if sampling.task == "s2v":
            prepared["references"] = reference_latents(vae, load_reference_images(
                sampling.ref_images[index], sampling.height, sampling.width))
        return prepared

    def noise_frames(self, latent_frames: int, prepared: dict) -> int:
        # Phantom draws the noise for the video and reference frames at once and keeps the video's
        refs = prepared["references"]
        return latent_frames + (0 if refs is None else refs.shape[2])

    def denoise(self, dits, texts: Texts, noise: torch.Tensor, generator: torch.Generator, prepared: dict,
                dtype: torch.dtype, show_progress: bool, cfg_group, on_step) -> torch.Tensor:
        context = texts.embeddings[0]
        return denoise(dits[0], context[:1], context[1:] if context.shape[0] > 1 else None, noise, self.sampling,
                       dtype, show_progress=show_progress, cfg_group=cfg_group, cond=self.cond,
                       condition=prepared["condition"], context_image=prepared["context_image"],
                       low_noise_dit=dits[1] if len(dits) > 1 else None, references=prepared["references"],
                       on_step=on_step)
