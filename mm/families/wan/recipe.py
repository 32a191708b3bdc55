"""Wan's training recipe (``wan_dit``: Wan2.1 / Wan2.2 T2V, I2V, FLF2V, TI2V): flow matching
(``mm.diffusion.flow_matching``) on the VAE latents, the image conditioning of ``WanConditioning``
(I2V/FLF2V channels and CLIP tokens, TI2V's first frame), the text embeddings zeroed past each
prompt."""

from __future__ import annotations

import torch

from mm.arguments import ConfigError
from mm.diffusion import FlowMatching, FlowMatchingConfig
from mm.families.spec import StepInputs
from mm.families.wan.flops import wan_training_flops
from mm.models.image_encoder.clip import check_num_heads
from mm.models.predictor.wan.conditioning import WanConditioning

CLIP_TOKENS = 257  # CLIP image tokens per conditioning image (Wan2.1 I2V / FLF2V's image branch)


def flow_matching_config(args, diffusion) -> FlowMatchingConfig:
    """The objective from the model JSON's ``diffusion``, with the expert's timestep range from
    --min/--max-timestep-boundary (fractions of num_train_timesteps; Wan2.2 A14B's high-noise expert
    trains on t >= boundary, the low-noise one below it)."""
    if diffusion is not None and diffusion.model_id != "flow_matching":
        raise ConfigError(f"diffusion.model_id = {diffusion.model_id!r} with a Wan predictor; valid: flow_matching")
    params = dict(diffusion.params if diffusion else {})
    steps = params.get("num_train_timesteps", FlowMatchingConfig.num_train_timesteps)
    if args.min_timestep_boundary is not None:
        params["min_timestep"] = args.min_timestep_boundary * steps
    if args.max_timestep_boundary is not None:
        params["max_timestep"] = args.max_timestep_boundary * steps
    return FlowMatchingConfig(**params)


class WanRecipe:
    """Wan2.1 / Wan2.2 (T2V, I2V, FLF2V, TI2V): flow matching on the VAE latents."""

    text_zero_padding = True  # Wan's DiT reads exact zeros past each prompt
    features_condition = True  # the I2V/FLF2V/TI2V condition is the sample's own frames, encoded

    def __init__(self, args, config, arch):
        self.arch = arch
        self.cond = WanConditioning.from_config(arch, config.data.dataset_type)
        self.flow = FlowMatching(flow_matching_config(args, config.model.diffusion))

    @staticmethod
    def check(task: str, config, arch) -> list[str]:
        try:
            cond = WanConditioning.from_config(arch, config.data.dataset_type)
        except ValueError as e:
            return [str(e)]
        problems = []
        in_dim = config.model.predictor.params.get("in_dim")
        if task == "t2v" and cond.kind != "none":
            problems.append(f"predictor.in_dim = {in_dim} with dataset_type {config.data.dataset_type!r} is "
                            f"{cond.kind} conditioning: train it with pretrain_i2v.py")
        if task == "i2v" and cond.kind == "none":
            problems.append(f"dataset_param.dataset_type = {config.data.dataset_type!r} with predictor.in_dim = "
                            f"{in_dim} is text-only conditioning: pretrain_i2v.py needs an i2v/flf2v dataset and an "
                            "image-conditioned model (use pretrain_t2v.py otherwise)")
        image = config.model.image_encoder
        features = getattr(config.data, "features", False)  # the CLIP tokens come with the features
        if cond.uses_clip and not features and (image is None or not image.from_pretrained):
            problems.append("predictor.image_dim is set (a CLIP image branch): the model JSON needs "
                            "image_encoder.from_pretrained (a CLIP vision model directory, or Wan's release "
                            "file models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")
        if cond.uses_clip and image is not None:
            problems += check_num_heads(image.params.get("num_heads"))
        try:
            flow_matching_config(config.args, config.model.diffusion)
        except (ConfigError, TypeError, ValueError) as e:
            problems.append(str(e))
        return problems

    def build_image_encoder(self, config):
        """The CLIP vision encoder of Wan2.1 I2V / FLF2V's image branch (None without one)."""
        if not self.cond.uses_clip:
            return None
        from mm.models.image_encoder import ClipImageEncoder

        return ClipImageEncoder.from_section(config.model.image_encoder)

    def encode_condition(self, vae, batch: dict, video: torch.Tensor, vae_cp, image_encoder, encode_dp, dtype):
        """(condition, context_image) of a batch on stage 0 (None, None for text-to-video)."""
        if self.cond.kind == "none":
            return None, None
        frames = batch["condition_frames"].to(video.device, dtype, non_blocking=True)
        condition = encode_dp(lambda f: self.cond.encode(vae, f, video.shape[2], vae_cp=vae_cp).to(dtype), frames)
        context_image = None
        if self.cond.uses_clip:
            context_image = encode_dp(lambda f: self.cond.encode_image(image_encoder, f).to(dtype), frames)
        return condition, context_image

    def draw(self, shape: torch.Size, noise_gen: torch.Generator, level_gen: torch.Generator,
             place: int, global_batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's fp32 noise ``shape`` and its noise level (a sigma)."""
        noise = torch.randn(shape, generator=noise_gen, device=device, dtype=torch.float32)
        return noise, self.flow.sample_sigmas(1, generator=level_gen, device=device)

    def step(self, encoded: dict, noise: torch.Tensor, levels: torch.Tensor) -> StepInputs:
        latents, context, context_image = encoded["latents"], encoded["context"][0], encoded["context_image"]
        target = self.flow.target(latents, noise)
        inputs, timestep = self.cond.model_input(self.flow.noisy(latents, noise, levels), self.flow.timesteps(levels),
                                                 encoded["condition"])
        flops = self.flops(inputs.shape[2:], [context.shape[1]], inputs.shape[0],
                           0 if context_image is None else context_image.shape[1])
        if self.flow.weighted:  # each sample's loss weight rides with the target, as one more channel
            # (fp32 on one stage; later pipeline stages get the pipeline's dtype, as Open-Sora-Plan's weights)
            weight = self.flow.weights(levels).reshape(-1, 1, 1, 1, 1)
            target = torch.cat([target.float(), weight.expand(-1, 1, *target.shape[2:])], dim=1)
        return StepInputs((inputs, timestep, context, context_image), target, flops)

    def flops(self, latent, text_lens, batch_size: int, image_len: int | None = None) -> int:
        """Model FLOPs of forward + backward of a micro-batch: ``latent`` (frames, height, width) as the DiT
        reads it, the text encoder's tokens, the CLIP image tokens (None: 257 per conditioning image)."""
        if image_len is None:
            image_len = CLIP_TOKENS * (2 if self.cond.kind == "flf2v" else 1) if self.cond.uses_clip else 0
        frames, height, width = latent
        return wan_training_flops(self.arch, frames, height, width, self.arch.text_len or text_lens[0], image_len,
                                  batch_size=batch_size, per_token_timestep=self.cond.kind == "ti2v")

    def loss(self, output: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        frames = self.cond.loss_frames  # TI2V: not the given first frame
        weights = None
        if self.flow.weighted:
            carry, weights = carry[:, :-1], carry[:, -1, 0, 0, 0]
        return self.flow.loss(output[:, :, frames], carry[:, :, frames], weights)
