"""Open-Sora-Plan v1.3's training recipe (``videoditsparse`` T2V, ``videoditsparsei2v`` I2V): the
v1.3 DDPM objective (``mm.diffusion.ddpm``: eps/v targets, min-SNR weights, explicit-uniform
timesteps), the caption mask passed to the DiT, and for I2V the masked-video + mask channels of
``mm.models.predictor.opensoraplan.conditioning``.

What travels to the last pipeline stage (``carry``) is the target plus one channel holding each
sample's loss weight (the min-SNR weight needs the timestep, which only stage 0 knows)."""

from __future__ import annotations

import torch

from mm.diffusion.ddpm import DDPM, DDPMConfig
from mm.families.opensoraplan.flops import opensoraplan_training_flops
from mm.families.spec import TRAINING_ENTRY_POINTS, StepInputs


class OpenSoraPlanRecipe:
    """Open-Sora-Plan v1.3 T2V (``videoditsparse``) and I2V (``videoditsparsei2v``): DDPM on the WFVAE
    latents, the caption mask to the DiT, min-SNR weights.

    Timesteps: the reference draws ``explicit_uniform`` timesteps per process from its 1/world slice
    of [0, N); here every sample of the global batch takes its own slice (rank = its place in the
    iteration's global batch, world = the global batch size), which is the reference's spread with one
    sample per process and does not depend on the DP layout. The latents are the WFVAE posterior mean
    (the reference draws from the posterior; its variance is small and a draw would make the latents
    depend on which rank encodes them under encoder-DP)."""

    text_zero_padding = False  # the DiT masks padded caption tokens itself

    def __init__(self, args, config, arch):
        self.arch = arch
        self.ddpm = DDPM(DDPMConfig.from_json(self.diffusion_section(config)))
        self.cond = None
        if arch.is_i2v:
            from mm.models.predictor.opensoraplan.conditioning import OpenSoraPlanConditioning

            self.cond = OpenSoraPlanConditioning.from_config(arch, config.data.masks)

    @staticmethod
    def diffusion_section(config) -> dict:
        diffusion = config.model.diffusion
        if diffusion is None:
            return {"model_id": "DDPM"}
        return {"model_id": diffusion.model_id, **diffusion.params}

    @staticmethod
    def check(task: str, config, arch) -> list[str]:
        problems = []
        model_id = config.model.predictor.model_id
        dataset_type = config.data.dataset_type
        if task == "t2v" and arch.is_i2v:
            problems.append(f"predictor.model_id = {model_id!r} is the I2V (inpainting) DiT: train it with "
                            "pretrain_i2v.py")
        if task == "i2v" and not arch.is_i2v:
            problems.append(f"predictor.model_id = {model_id!r} is the T2V DiT: pretrain_i2v.py trains "
                            "'videoditsparsei2v' (use pretrain_t2v.py otherwise)")
        valid = ("t2v", "t2i", "image") if task == "t2v" else ("i2v", "t2v")
        if dataset_type not in valid:
            problems.append(f"dataset_param.dataset_type = {dataset_type!r} with {TRAINING_ENTRY_POINTS[task]} and predictor "
                            f"{model_id!r}; valid: {', '.join(valid)}")
        try:
            DDPMConfig.from_json(OpenSoraPlanRecipe.diffusion_section(config))
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        if arch.is_i2v:
            from mm.models.predictor.opensoraplan.conditioning import OpenSoraPlanConditioning

            try:
                OpenSoraPlanConditioning.from_config(arch, config.data.masks)
            except (TypeError, ValueError) as e:
                problems.append(str(e))
        elif config.data.masks:
            problems.append(f"dataset_param.{', '.join(sorted(config.data.masks))}: inpainting masks are for the I2V "
                            f"DiT (videoditsparsei2v); predictor {model_id!r} is text-to-video")
        if config.model.image_encoder is not None:
            problems.append(f"image_encoder: predictor {model_id!r} has no image encoder (its I2V condition is the "
                            "VAE-encoded masked video); remove the section")
        return problems

    def build_image_encoder(self, config):
        return None

    def encode_condition(self, vae, batch: dict, video: torch.Tensor, vae_cp, image_encoder, encode_dp, dtype):
        if self.cond is None:
            return None, None
        seeds = batch["seeds"].to(video.device)
        condition = encode_dp(lambda v, s: self.cond.encode(vae, v, s.tolist(), vae_cp=vae_cp).to(dtype), video,
                              seeds)
        return condition, None

    def draw(self, shape: torch.Size, noise_gen: torch.Generator, level_gen: torch.Generator,
             place: int, global_batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's fp32 noise (with the offset noise, if any) and integer timestep."""
        noise = self.ddpm.sample_noise((1, *shape), generator=noise_gen, device=device)[0]
        t = self.ddpm.sample_timesteps(1, generator=level_gen, rank=place % global_batch, world_size=global_batch)
        return noise, t.to(device)

    def step(self, encoded: dict, noise: torch.Tensor, timesteps: torch.Tensor) -> StepInputs:
        latents, context = encoded["latents"], encoded["context"][0]
        noise = noise.to(latents.dtype)
        inputs = self.ddpm.noisy(latents, noise, timesteps)
        if self.cond is not None:
            inputs = self.cond.model_input(inputs, timesteps, encoded["condition"])[0]
        target = self.ddpm.target(latents, noise, timesteps)
        weights = self.ddpm.loss_weights(timesteps)
        weights = torch.ones(latents.shape[0], device=latents.device) if weights is None else weights
        # fp32, so one stage computes the loss from exactly what it drew (later stages get the pipeline's dtype)
        weight_channel = weights.float().reshape(-1, 1, 1, 1, 1).expand(-1, 1, *target.shape[2:])
        flops = self.flops(latents.shape[2:], [context.shape[1]], latents.shape[0])
        return StepInputs((inputs, timesteps, context, encoded["context_mask"][0]),
                          torch.cat([target.float(), weight_channel], dim=1), flops)

    def flops(self, latent, text_lens, batch_size: int) -> int:
        """Model FLOPs of forward + backward of a micro-batch: ``latent`` (frames, height, width), the text
        tokens."""
        frames, height, width = latent
        return opensoraplan_training_flops(self.arch, frames, height, width, text_lens[0], batch_size=batch_size)

    def loss(self, output: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        target, weights = carry[:, :-1], carry[:, -1, 0, 0, 0]
        return self.ddpm.weighted_loss(output, target, weights if self.ddpm.config.snr_gamma is not None else None)
