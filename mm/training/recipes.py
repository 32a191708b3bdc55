"""What each model family trains: how stage 0 turns a data batch into the DiT's inputs, target and
loss, how full release weights load into a stage, and the model FLOPs of a micro-batch.

``pretrain`` runs one loop for every family; ``recipe_for(predictor.model_id)`` picks the family:

- ``WanRecipe`` (``wan_dit``): Wan's flow matching (``mm.diffusion.flow_matching``), the image
  conditioning of ``WanConditioning`` (I2V/FLF2V channels and CLIP tokens, TI2V's first frame), the
  text embeddings zeroed past each prompt.
- ``OpenSoraPlanRecipe`` (``videoditsparse``, ``videoditsparsei2v``): the v1.3 DDPM objective
  (``mm.diffusion.ddpm``: eps/v targets, min-SNR weights, explicit-uniform timesteps), the caption
  mask passed to the DiT, and for I2V the masked-video + mask channels of
  ``mm.models.predictor.opensoraplan.conditioning``.

Per sample the loop seeds two generators from (run seed, iteration, the sample's place in the global
batch) and the recipe draws the noise from one (on the device) and the noise level from the other
(on the host), so every TP/CP/PP rank of a replica draws the same and any DP layout that puts the
same samples in an iteration trains the same.

What travels to the last pipeline stage is ``carry``: the target, and for Open-Sora-Plan one extra
channel holding each sample's loss weight (the min-SNR weight needs the timestep, which only stage
0 knows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm.arguments import ConfigError
from mm.data.dataset import VideoDataConfig
from mm.diffusion import FlowMatching, FlowMatchingConfig
from mm.diffusion.ddpm import DDPM, DDPMConfig
from mm.models.predictor import predictor_config
from mm.models.predictor.wan import load_hf_weights
from mm.models.predictor.wan.conditioning import WanConditioning
from mm.training.flops import opensoraplan_training_flops, wan_training_flops

TASKS = {"t2v": "pretrain_t2v.py", "i2v": "pretrain_i2v.py"}


@dataclass
class StepInputs:
    """One micro-batch's DiT call on stage 0 and what the last stage needs for the loss."""

    args: tuple  # positional DiT inputs
    carry: torch.Tensor  # the target (and the family's loss extras), [b, c, f, h, w]
    flops: int  # model FLOPs of forward + backward of this micro-batch


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
        if cond.uses_clip and (image is None or not image.from_pretrained):
            problems.append("predictor.image_dim is set (a CLIP image branch): the model JSON needs "
                            "image_encoder.from_pretrained (a CLIP vision model directory)")
        try:
            flow_matching_config(config.args, config.model.diffusion)
        except (ConfigError, TypeError, ValueError) as e:
            problems.append(str(e))
        return problems

    @property
    def uses_clip(self) -> bool:
        return self.cond.uses_clip

    def load_weights(self, chunk, source: dict[str, torch.Tensor], tp_size: int, tp_rank: int) -> None:
        load_hf_weights(chunk, source, tp_size=tp_size, tp_rank=tp_rank)

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
        latents, context, context_image = encoded["latents"], encoded["context"], encoded["context_image"]
        target = self.flow.target(latents, noise)
        inputs, timestep = self.cond.model_input(self.flow.noisy(latents, noise, levels), self.flow.timesteps(levels),
                                                 encoded["condition"])
        _, _, frames, height, width = inputs.shape
        flops = wan_training_flops(self.arch, frames, height, width, context.shape[1],
                                   0 if context_image is None else context_image.shape[1],
                                   batch_size=inputs.shape[0], per_token_timestep=self.cond.kind == "ti2v")
        return StepInputs((inputs, timestep, context, context_image), target, flops)

    def loss(self, output: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        frames = self.cond.loss_frames  # TI2V: not the given first frame
        return self.flow.loss(output[:, :, frames], carry[:, :, frames])


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
            problems.append(f"dataset_param.dataset_type = {dataset_type!r} with {TASKS[task]} and predictor "
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
        if config.args.compile_dit_blocks:
            problems.append(f"--compile-dit-blocks compiles the Wan DiT's layers; predictor {model_id!r} runs eager: "
                            "leave the flag out")
        if config.model.image_encoder is not None:
            problems.append(f"image_encoder: predictor {model_id!r} has no image encoder (its I2V condition is the "
                            "VAE-encoded masked video); remove the section")
        ae = config.model.ae
        if ae is not None and ae.model_id != "wfvae":
            problems.append(f"ae.model_id = {ae.model_id!r} with predictor {model_id!r}; valid: wfvae")
        return problems

    uses_clip = False

    def load_weights(self, chunk, source: dict[str, torch.Tensor], tp_size: int, tp_rank: int) -> None:
        from mm.models.predictor.opensoraplan.weights import load_reference_weights

        load_reference_weights(chunk, source, tp_size=tp_size, tp_rank=tp_rank)

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
        latents, context = encoded["latents"], encoded["context"]
        noise = noise.to(latents.dtype)
        inputs = self.ddpm.noisy(latents, noise, timesteps)
        if self.cond is not None:
            inputs = self.cond.model_input(inputs, timesteps, encoded["condition"])[0]
        target = self.ddpm.target(latents, noise, timesteps)
        weights = self.ddpm.loss_weights(timesteps)
        weights = torch.ones(latents.shape[0], device=latents.device) if weights is None else weights
        # fp32, so one stage computes the loss from exactly what it drew (later stages get the pipeline's dtype)
        weight_channel = weights.float().reshape(-1, 1, 1, 1, 1).expand(-1, 1, *target.shape[2:])
        _, _, frames, height, width = latents.shape
        flops = opensoraplan_training_flops(self.arch, frames, height, width, context.shape[1],
                                            batch_size=latents.shape[0])
        return StepInputs((inputs, timesteps, context, encoded["context_mask"]),
                          torch.cat([target.float(), weight_channel], dim=1), flops)

    def loss(self, output: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        target, weights = carry[:, :-1], carry[:, -1, 0, 0, 0]
        return self.ddpm.weighted_loss(output, target, weights if self.ddpm.config.snr_gamma is not None else None)


RECIPES = {"wan_dit": WanRecipe, "videoditsparse": OpenSoraPlanRecipe, "videoditsparsei2v": OpenSoraPlanRecipe}


def recipe_for(model_id: str):
    if model_id not in RECIPES:
        raise ConfigError(f"predictor.model_id = {model_id!r}; valid: {', '.join(sorted(RECIPES))}")
    return RECIPES[model_id]


def check_task(task: str, config) -> None:
    """The model JSON, data JSON and entry point fit together (raises ConfigError listing every problem)."""
    from mm.training.logger import LogConfig, require_logging_packages

    pred = config.model.predictor
    try:
        arch = predictor_config(pred.model_id, pred.params, pred.num_layers, pred.num_heads)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    problems = recipe_for(pred.model_id).check(task, config, arch)
    try:  # the data JSON's preprocessing, before any process group starts rather than in the loader
        VideoDataConfig.from_json(config.data.preprocess, config.data.dataset_type)
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    if config.model.task is not None and config.model.task != task:
        problems.append(f"task = {config.model.task!r} in the model JSON: train it with {TASKS[config.model.task]}, "
                        f"not {TASKS[task]}")
    try:
        require_logging_packages(LogConfig.from_args(config.args))
    except SystemExit as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems)

