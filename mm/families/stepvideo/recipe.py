"""Step-Video-T2V's training recipe (``stepvideodit``, ``pretrain_t2v.py``): the flow matching of
``mm.diffusion.flow_match_discrete`` (the release sampler's convention: ``x_t = t x0 + (1 - t) noise``,
the DiT predicts ``x0 - noise`` and is given ``t``) on the Step-Video VAE's latents, with the
Step-LLM and HunyuanCLIP embeddings as the cross-attention context."""

from __future__ import annotations

import torch

from mm.diffusion.flow_match_discrete import FlowMatchDiscrete, FlowMatchDiscreteConfig
from mm.families.spec import StepInputs
from mm.families.stepvideo.flops import stepvideo_training_flops
from mm.families.stepvideo.vae import stepvideo_vae_config


def objective_config(diffusion) -> FlowMatchDiscreteConfig:
    """The model JSON's ``diffusion`` section (a ComponentConfig or None) as the objective's config."""
    section = {} if diffusion is None else {"model_id": diffusion.model_id, **diffusion.params}
    return FlowMatchDiscreteConfig.from_json(section)


class StepVideoRecipe:
    """Text-to-video flow matching of the Step-Video-T2V DiT."""

    text_zero_padding = False  # the DiT masks the Step-LLM padding itself; CLIP's 77 tokens are all attended

    def __init__(self, args, config, arch):
        self.arch = arch
        self.flow = FlowMatchDiscrete(objective_config(config.model.diffusion))

    @staticmethod
    def check(task: str, config, arch) -> list[str]:
        problems = []
        if task != "t2v":
            problems.append(f"predictor.model_id = 'stepvideodit' with {task}: Step-Video-T2V trains text to video "
                            "with pretrain_t2v.py (Step-Video-TI2V, use_additional_conditions, is not built)")
        try:
            objective = objective_config(config.model.diffusion)
            FlowMatchDiscrete(objective)
            if objective.precondition_outputs:
                problems.append("diffusion.precondition_outputs = true: not supported by mm's Step-Video training "
                                "(the loss is the velocity's squared error); valid: false")
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        ae = config.model.ae
        frames = (config.data.preprocess or {}).get("num_frames") if config.data is not None else None
        if ae is not None and isinstance(frames, int):
            try:
                cfg = stepvideo_vae_config(ae.from_pretrained, ae.params)
                cfg.check_frames(frames, prefix="dataset_param.preprocess_parameters.")
            except (ValueError, FileNotFoundError) as e:
                problems.append(str(e))
        return problems

    def build_image_encoder(self, config):
        return None

    def encode_condition(self, vae, batch: dict, video: torch.Tensor, vae_cp, image_encoder, encode_dp, dtype):
        return None, None

    def draw(self, shape: torch.Size, noise_gen: torch.Generator, level_gen: torch.Generator,
             place: int, global_batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's fp32 noise ``shape`` and its level ``t`` (the data fraction)."""
        noise = torch.randn(shape, generator=noise_gen, device=device, dtype=torch.float32)
        return noise, self.flow.sample_levels(1, generator=level_gen, device=device)

    def step(self, encoded: dict, noise: torch.Tensor, levels: torch.Tensor) -> StepInputs:
        latents = encoded["latents"]
        (llm, clip), (llm_mask, _) = encoded["context"], encoded["context_mask"]
        target = self.flow.target(latents, noise)
        noisy = self.flow.noisy(latents, noise, levels)
        timestep = self.flow.timesteps(levels).to(noisy.dtype)  # the DiT embeds t * 1000 in t's dtype
        flops = self.flops(noisy.shape[2:], [llm.shape[1], clip.shape[1]], noisy.shape[0])
        clip_context = clip if self.arch.clip_channels is not None else None
        return StepInputs((noisy, timestep, llm, llm_mask, clip_context), target, flops)

    def flops(self, latent, text_lens, batch_size: int) -> int:
        """Model FLOPs of forward + backward of a micro-batch: ``latent`` (frames, height, width), the
        Step-LLM and CLIP token lengths."""
        frames, height, width = latent
        return stepvideo_training_flops(self.arch, frames, height, width, text_lens[0],
                                        text_lens[1] if self.arch.clip_channels is not None else 0,
                                        batch_size=batch_size)

    def loss(self, output: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        return self.flow.loss(output, carry)
