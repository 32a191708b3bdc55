"""The toy family's training recipe and sampler: flow matching (mm's objective and Euler/UniPC
samplers) on the identity-like AE's latents, every text encoder's output handed to the DiT."""

from __future__ import annotations

import math

import torch

from mm.diffusion import FlowMatching, FlowMatchingConfig
from mm.diffusion.samplers import build_sampler
from mm.families.spec import StepInputs, Texts


class ToyRecipe:
    text_zero_padding = True
    def build_image_encoder(self, config):
        return None

    def __init__(self, args, config, arch):
        self.arch = arch
        self.flow = FlowMatching(FlowMatchingConfig())

    @staticmethod
    def check(task: str, config, arch) -> list[str]:
        if task != "t2v":
            return ["the toy family trains text-to-video only: use pretrain_t2v.py"]
        return []

    def encode_condition(self, vae, batch, video, vae_cp, image_encoder, encode_dp, dtype):
        return None, None

    def draw(self, shape, noise_gen, level_gen, place, global_batch, device):
        noise = torch.randn(shape, generator=noise_gen, device=device, dtype=torch.float32)
        return noise, self.flow.sample_sigmas(1, generator=level_gen, device=device)

    def step(self, encoded: dict, noise: torch.Tensor, levels: torch.Tensor) -> StepInputs:
        latents = encoded["latents"]
        texts = [t for pair in zip(encoded["context"], encoded["context_mask"]) for t in pair]
        inputs = self.flow.noisy(latents, noise, levels)
        tokens = math.prod(latents.shape[2:]) // math.prod(self.arch.patch_size)
        flops = 3 * 2 * latents.shape[0] * tokens * self.arch.hidden_size ** 2 * 12 * self.arch.num_layers
        return StepInputs((inputs, self.flow.timesteps(levels), *texts), self.flow.target(latents, noise), flops)

    def loss(self, output: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        return self.flow.loss(output, carry)


class ToySampler:
    text_zero_padding = True

    @staticmethod
    def check(config, arch, section: dict) -> list[str]:
        return []

    @staticmethod
    def check_sampling(config, arch, sampling, temporal: int) -> list[str]:
        problems = []
        if sampling.task != "t2v":
            problems.append(f"inference.task = {sampling.task!r}: the toy family samples t2v only")
        if config.args.cfg_parallel:
            problems.append("--cfg-parallel: the toy sampler runs both guidance branches on each rank")
        return problems

    @staticmethod
    def guided(config, sampling) -> bool:
        return sampling.guidance_scale != 1.0

    def __init__(self, config, arch, sampling, home):
        self.sampling = sampling
        self.steps, self.solver = sampling.sample_steps, sampling.sample_solver
        self.image_encoder = None

    def prepare(self, index, vae, vae_cp, device, dtype) -> dict:
        return {}

    def noise_frames(self, latent_frames: int, prepared: dict) -> int:
        return latent_frames

    @torch.no_grad()
    def denoise(self, dits, texts: Texts, noise, generator, prepared, dtype, show_progress, cfg_group, on_step):
        s = self.sampling
        sampler = build_sampler(s.sample_solver, s.sample_steps, s.sample_shift)
        latents = noise.float()

        def velocity(rows: Texts, t):
            args = [x for pair in zip(rows.embeddings, rows.masks) for x in pair]
            return dits[0](latents.to(dtype), t.float().expand(1).to(latents.device), *args).float()

        for t in sampler.timesteps:
            v = velocity(texts.rows(0, 1), t)
            if texts.embeddings[0].shape[0] > 1:
                unconditional = velocity(texts.rows(1, 2), t)
                v = unconditional + s.guidance_scale * (v - unconditional)
            latents = sampler.step(v, latents)
            on_step()
        return latents
