"""Step-Video-T2V's sampling (``inference.py`` with a ``stepvideodit`` predictor): the release's Euler
sampler (``mm.diffusion.flow_match_discrete``: the model JSON's ``diffusion`` section gives the steps and
the time shift) with classifier-free guidance, as the release's pipeline runs it: the conditional and
unconditional branches in one batch of two ([cond; uncond]; with ``--cfg-parallel`` one branch per rank
of a pair), each timestep cast to the DiT's dtype (the DiT embeds ``t * 1000`` in that dtype), the
guided velocity combined in the DiT's output dtype, the latents stepped in fp32.

The release appends a fixed quality text to every prompt and uses a fixed negative prompt; they are
this family's defaults of ``inference.prompt_suffix`` and ``inference.negative_prompt``."""

from __future__ import annotations

import torch
from tqdm import tqdm

from mm.diffusion.flow_match_discrete import guidance_enabled, guided_velocity
from mm.families.spec import Texts
from mm.families.stepvideo.recipe import objective_config

# the release's prompt additions (its sampling script's defaults)
POSITIVE_SUFFIX = ("超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、"
                   "超细节、清晰。")
NEGATIVE_PROMPT = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"

# inference-section keys that are the diffusion section's here
_DIFFUSION_KEYS = {"sample_steps": "diffusion.num_inference_timesteps",
                   "num_inference_steps": "diffusion.num_inference_timesteps",
                   "sample_shift": "diffusion.shift", "flow_shift": "diffusion.shift", "sample_solver": "diffusion.solver",
                   "low_noise_model": None, "boundary_ratio": None, "guidance_scale_2": None, "ref_images": None,
                   "image": None, "conditional_pixel_values_path": None, "last_image": None}


@torch.no_grad()
def denoise(dit, texts: Texts, noise: torch.Tensor, sampler, guidance_scale: float, dtype: torch.dtype,
            show_progress: bool = False, cfg_group=None, on_step=None) -> torch.Tensor:
    """fp32 latents ``[1, c, f, h, w]`` from ``noise``. ``texts``: Step-LLM and CLIP embeddings and masks,
    row 0 the prompt, row 1 (guidance on) the negative prompt. ``cfg_group``: a pair of ranks, the first
    running the conditional branch, the second the unconditional one; they exchange their outputs each
    step and both combine them as one rank would."""
    (llm, clip), llm_mask = texts.embeddings, texts.masks[0]
    guided = llm.shape[0] > 1
    branch = None if cfg_group is None or not guided else torch.distributed.get_rank(cfg_group)
    if branch is not None:  # this rank's branch only
        llm, clip, llm_mask = llm[branch:branch + 1], clip[branch:branch + 1], llm_mask[branch:branch + 1]
    latents = noise.float()
    rows = llm.shape[0]
    for t in tqdm(sampler.timesteps, desc="denoising", disable=not show_progress, leave=False):
        x = latents.to(dtype).expand(rows, *latents.shape[1:])
        timestep = t.to(dtype).expand(rows).to(latents.device)
        out = dit(latents=x, timestep=timestep, llm_context=llm.to(dtype), llm_mask=llm_mask,
                  clip_context=clip.to(dtype))
        if branch is not None:
            both = [torch.empty_like(out) for _ in range(2)]
            torch.distributed.all_gather(both, out.contiguous(), group=cfg_group)
            out = torch.cat(both)
        velocity = guided_velocity(out, guidance_scale) if guided else out
        latents = sampler.step(velocity.float(), latents)
        if on_step is not None:
            on_step()
    return latents


class StepVideoSampler:
    """Step-Video-T2V's part of a sampling run: the Euler sampler of the ``diffusion`` section and guidance."""

    text_zero_padding = False
    # the release's video and guidance (204 frames at 544 x 992, 25 fps, scale 9.0) and prompt additions
    defaults = {"num_frames": 204, "height": 544, "width": 992, "fps": 25, "guidance_scale": 9.0,
                "negative_prompt": NEGATIVE_PROMPT, "prompt_suffix": POSITIVE_SUFFIX}

    @staticmethod
    def check(config, arch, section: dict) -> list[str]:
        """The sampler is the ``diffusion`` section (``num_inference_timesteps``, ``shift``), and only text
        to video is built."""
        problems = [f"inference.{key} is not a Step-Video-T2V sampling key" + (f": set {where}" if where else "")
                    for key, where in _DIFFUSION_KEYS.items() if key in section]
        try:
            objective_config(config.model.diffusion)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        return problems

    @staticmethod
    def check_sampling(config, arch, sampling, temporal: int) -> list[str]:
        if sampling.task != "t2v":
            return [f"inference.task = {sampling.task!r} with predictor 'stepvideodit'; valid: t2v"]
        return []

    @staticmethod
    def guided(config, sampling) -> bool:
        return guidance_enabled(sampling.guidance_scale)

    def __init__(self, config, arch, sampling, home: torch.device):
        self.sampling = sampling
        self.config = objective_config(config.model.diffusion)
        self.steps, self.solver = self.config.num_inference_timesteps, self.config.solver
        self.image_encoder = None

    def prepare(self, index: int, vae, vae_cp, device, dtype) -> dict:
        return {}

    def noise_frames(self, latent_frames: int, prepared: dict) -> int:
        return latent_frames

    def denoise(self, dits, texts: Texts, noise: torch.Tensor, generator: torch.Generator, prepared: dict,
                dtype: torch.dtype, show_progress: bool, cfg_group, on_step) -> torch.Tensor:
        return denoise(dits[0], texts, noise, self.config.sampler(), self.sampling.guidance_scale, dtype,
                       show_progress=show_progress, cfg_group=cfg_group, on_step=on_step)
