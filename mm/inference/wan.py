"""Video sampling: ``inference.py --mm-model inference_model.json [parallel flags]``.

Wan text-to-video and image-to-video (Wan2.1 I2V, FLF2V; Wan2.2 I2V-A14B's channel-concatenated
condition; Wan2.2 TI2V-5B's first latent frame, clean at timestep 0 on every step; Phantom
subject-to-video on a Wan2.1 T2V DiT, ``mm.inference.subject``) with flow-matching samplers, and
Open-Sora-Plan v1.3 T2V / I2V with its DDPM-family samplers (``mm.inference.opensoraplan``); the
family follows ``predictor.model_id``.

Every rank builds the DiT for its TP rank (context parallelism splits the sequence inside the
DiT's attention, so every rank of a TP x CP group runs the same loop on the same latents), the
text encoder and the VAE. Data-parallel replicas take turns over the prompts (prompt i goes to
replica i mod DP); with --cfg-parallel two replicas form a pair that runs one prompt, the first
the conditional branch and the second the unconditional one. For each prompt: encode the prompt
and the negative prompt, draw the noise from ``seed + prompt index`` (on the CPU, so every rank
and device draws the same), run the sampler with classifier-free guidance, and the replica's
first rank decodes and writes ``<save_path>/<prompt words>_seed<seed>.mp4`` (``_1``, ``_2``, ... if
that exists).

The DiT's weights come from ``predictor.from_pretrained`` (diffusers or original Wan; the
Open-Sora-Plan release or MindSpeed-MM's names) or from ``--load`` (an mm checkpoint of either format:
a training run's, or mm-convert's).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from megatron.core import parallel_state as mpu
from tqdm import tqdm

from mm.accelerator import destroy_distributed
from mm.arguments import ConfigError
from mm.ckpt import load_model
from mm.data.video_writer import write_mp4
from mm.diffusion.samplers import build_sampler
from mm.inference.config import SamplingConfig, parse_sampling
from mm.inference import opensoraplan
from mm.inference.subject import load_reference_images, reference_latents
from mm.models.ae import load_vae
from mm.models.image_encoder import ClipImageEncoder
from mm.models.predictor import build_predictor, predictor_config
from mm.models.predictor.opensoraplan.weights import load_reference_weights
from mm.models.predictor.transformer_config import params_dtype, transformer_config
from mm.models.predictor.wan import load_hf_weights, read_weights
from mm.models.predictor.wan.conditioning import WanConditioning
from mm.models.text_encoder import TextEncoder
from mm.parallel import get_group, get_group_ranks
from mm.parallel.fsdp import shard_parameters
from mm.runtime import start

PROG = "inference.py"


OPEN_SORA_PLAN = ("videoditsparse", "videoditsparsei2v")


def is_open_sora_plan(config) -> bool:
    return config.model.predictor.model_id in OPEN_SORA_PLAN


def _vae_factors(config) -> tuple[int, int]:
    """(spatial, temporal) compression of the model JSON's VAE (Wan2.1: 8, 4; Wan2.2's: 16, 4, from its
    config.json; WFVAE: 8, 4)."""
    import json

    from mm.models.ae.wan_vae import WanVAEConfig
    from mm.models.ae.wfvae import WFVAEConfig

    if config.model.ae.model_id == "wfvae":
        return WFVAEConfig.scale_factor_spatial, WFVAEConfig.scale_factor_temporal
    path = Path(config.model.ae.from_pretrained) / "config.json"
    if not path.is_file():
        raise ConfigError(f"ae.from_pretrained = {config.model.ae.from_pretrained!r}: no config.json there")
    vae = WanVAEConfig.from_json(json.loads(path.read_text()))
    return vae.scale_factor_spatial, vae.scale_factor_temporal


def sampling_config(config) -> SamplingConfig:
    """The model JSON's ``inference`` section, checked (ConfigError naming every bad key)."""
    problems: list[str] = []
    pred = config.model.predictor
    try:
        arch = predictor_config(pred.model_id, pred.params, pred.num_layers, pred.num_heads)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if config.args.pipeline_model_parallel_size != 1:
        problems.append(f"--pipeline-model-parallel-size {config.args.pipeline_model_parallel_size}: inference runs "
                        "the whole DiT on every rank of a TP x CP group; valid: 1")
    if config.args.cfg_parallel and config.sizes.data_parallel % 2:
        problems.append(f"--cfg-parallel pairs data-parallel ranks; the data-parallel size is "
                        f"{config.sizes.data_parallel} (world / (TP x CP)); valid: an even size")
    if not pred.from_pretrained and config.args.load is None:
        problems.append("the DiT's weights: give predictor.from_pretrained (diffusers/original Wan) or --load (an mm "
                        "checkpoint)")
    for section in ("ae", "text_encoder"):
        part = getattr(config.model, section)
        part = part[0] if isinstance(part, list) and part else part
        if not part or not part.from_pretrained:
            problems.append(f"{section}.from_pretrained: needed to sample (a local directory)")
    spatial, temporal = _vae_factors(config) if not problems else (8, 4)
    section = config.model.extra.get("inference", {})
    osp = is_open_sora_plan(config)
    if osp:
        problems.extend(_open_sora_plan_problems(config, arch, section))
    sampling = parse_sampling(section, spatial, temporal, tuple(arch.patch_size), problems)
    if not problems and osp:
        if sampling.task not in ("t2v", "i2v"):
            problems.append(f"inference.task = {sampling.task!r} with predictor {config.model.predictor.model_id!r}; "
                            "valid: t2v, i2v")
        elif (sampling.task == "i2v") != arch.is_i2v:
            problems.append(f"inference.task = {sampling.task!r} with predictor {config.model.predictor.model_id!r}: "
                            + ("the I2V DiT needs inference.conditional_pixel_values_path (task i2v)" if arch.is_i2v
                               else "the T2V DiT samples task t2v (leave conditional_pixel_values_path out)"))
    elif not problems:
        try:
            cond = WanConditioning.from_config(arch, conditioning_task(sampling.task))
        except ValueError as e:
            problems.append(f"inference.task = {sampling.task!r} with predictor (in_dim {arch.in_dim}, image_dim "
                            f"{arch.image_dim}): {e}")
        else:
            if cond.kind == "ti2v" and (sampling.num_frames - 1) // temporal < 1:
                problems.append(f"inference.num_frames = {sampling.num_frames} with task 'i2v' on a TI2V model "
                                f"(predictor.in_dim = out_dim = {arch.in_dim}): the first latent frame is the "
                                f"image, so at least {temporal + 1} frames are needed")
            if cond.uses_clip and not (config.model.image_encoder and config.model.image_encoder.from_pretrained):
                problems.append("predictor.image_dim is set (a CLIP image branch): the model JSON needs "
                                "image_encoder.from_pretrained (a CLIP vision model directory)")
    if sampling is not None:
        cp, tpcp = config.sizes.context_parallel, config.sizes.tensor_parallel * config.sizes.context_parallel
        if sampling.dit_fsdp and cp == 1:
            problems.append("inference.dit_fsdp shards the DiT over its context-parallel group, which is 1 rank here: "
                            "set --context-parallel-size (or ulysses_size x ring_size) > 1, or dit_fsdp false")
        if sampling.t5_fsdp and tpcp == 1:
            problems.append("inference.t5_fsdp shards the text encoder over the TP x CP group, which is 1 rank here: "
                            "set --tensor-model-parallel-size or --context-parallel-size > 1, or t5_fsdp false")
        vae_cp = config.sizes.vae_cp_size
        if vae_cp > 1 and (sampling.num_frames - 1) // temporal < 2 * vae_cp:
            problems.append(f"ae.vae_cp_size = {vae_cp} with inference.num_frames = {sampling.num_frames}: VAE-CP "
                            f"gives each rank at least 2 latent frames after the first; valid: num_frames >= "
                            f"{1 + 2 * vae_cp * temporal}, or a smaller vae_cp_size")
    if sampling is not None and sampling.task == "s2v" and config.args.cfg_parallel:
        problems.append("--cfg-parallel splits two guidance branches over a pair of ranks; Phantom's s2v guidance "
                        "has three (text, image, neither): leave --cfg-parallel out")
    if sampling is not None and config.args.cfg_parallel and not problems:
        if osp and not opensoraplan.sampler_config(config.model.diffusion).do_classifier_free_guidance:
            problems.append("--cfg-parallel with diffusion.guidance_scale <= 1 (guidance off): there is no second "
                            "branch")
        elif not osp and not _wan_guided(sampling):
            problems.append("--cfg-parallel with inference.guidance_scale = 1 (guidance off): there is no second "
                            "branch")
    if problems:
        raise ConfigError(problems)
    return sampling


def _open_sora_plan_problems(config, arch, section: dict) -> list[str]:
    """What the Open-Sora-Plan family checks beyond the shared keys: its sampler is the ``diffusion``
    section, so the flow-matching keys of the inference section do not apply."""
    problems = []
    for key in ("sample_steps", "num_inference_steps", "sample_shift", "flow_shift", "sample_solver",
                "guidance_scale", "sample_guide_scale", "low_noise_model", "boundary_ratio", "ref_images"):
        if key in section:
            where = {"sample_steps": "diffusion.num_inference_steps", "num_inference_steps":
                     "diffusion.num_inference_steps", "sample_solver": "diffusion.model_id",
                     "guidance_scale": "diffusion.guidance_scale", "sample_guide_scale": "diffusion.guidance_scale"}
            problems.append(f"inference.{key} is not an Open-Sora-Plan sampling key"
                            + (f": set {where[key]}" if key in where else ""))
    try:
        opensoraplan.sampler_config(config.model.diffusion)
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    if config.args.compile_dit_blocks:
        problems.append(f"--compile-dit-blocks compiles the Wan DiT's layers; predictor "
                        f"{config.model.predictor.model_id!r} runs eager: leave the flag out")
    if config.model.ae.model_id != "wfvae":
        problems.append(f"ae.model_id = {config.model.ae.model_id!r} with predictor "
                        f"{config.model.predictor.model_id!r}; valid: wfvae")
    return problems


def _wan_guided(sampling: SamplingConfig) -> bool:
    """Whether any step runs classifier-free guidance: a scale other than 1 for either expert (Wan2.2
    A14B's low-noise expert has its own, ``guidance_scale_2``), or Phantom's three branches."""
    second = sampling.guidance_scale_2
    return sampling.guidance_scale != 1.0 or (second is not None and second != 1.0) or sampling.task == "s2v"


def _osp_conditioning(arch):
    """The I2V DiT's masked-video + mask conditioning (first frame given), None for T2V."""
    if not arch.is_i2v:
        return None
    from mm.models.predictor.opensoraplan.conditioning import OpenSoraPlanConditioning

    return OpenSoraPlanConditioning.from_config(arch, None)


def conditioning_task(task: str) -> str:
    """The WanConditioning a sampling task uses: Phantom's s2v runs a text-to-video DiT."""
    return "t2v" if task == "s2v" else task


def output_path(directory: Path, prompt: str, seed: int) -> Path:
    """``<directory>/<first words of the prompt>_seed<seed>.mp4``; never an existing file."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:60] or "prompt"
    path = directory / f"{words}_seed{seed}.mp4"
    n = 1
    while path.exists():
        path = directory / f"{words}_seed{seed}_{n}.mp4"
        n += 1
    return path


@torch.no_grad()
def denoise(dit, context: torch.Tensor, negative: torch.Tensor | None, noise: torch.Tensor, sampling: SamplingConfig,
            dtype: torch.dtype, show_progress: bool, cfg_group=None, cond: WanConditioning | None = None,
            condition: torch.Tensor | None = None, context_image: torch.Tensor | None = None,
            low_noise_dit=None, references: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
    """The sampler's loop with classifier-free guidance (``negative`` None: guidance off); fp32 latents.

    ``cfg_group``: a pair of ranks (--cfg-parallel) of which the first runs the conditional branch and
    the second the unconditional one; they swap their velocities each step and both combine them
    as one rank would. ``cond``/``condition``/``context_image``: an image-conditioned model's
    conditioning (WanConditioning, its encoded condition, the CLIP tokens), the same for both
    branches. ``low_noise_dit``: Wan2.2 A14B's second expert, which takes over (with
    ``guidance_scale_2``) below ``boundary_ratio`` x 1000. ``references [1, z, N, h, w]``: Phantom's
    reference latents after the video frames, with its three-branch guidance
    (``mm.inference.subject``; ``negative`` is then required). ``on_step``: called after every step."""
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


def load_condition_frames(paths: list[str], height: int, width: int) -> torch.Tensor:
    """``[1, 3, len(paths), height, width]`` in [-1, 1]: the images, resized (Lanczos) to the video size."""
    from PIL import Image

    frames = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            frames.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return (torch.stack(frames, dim=1).float() / 127.5 - 1.0).unsqueeze(0)


def to_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def inference(argv: Sequence[str] | None = None) -> list[Path]:
    """Sample every prompt of the model JSON; returns the .mp4 paths this rank wrote."""
    checked = {}  # the inference section as start()'s check parsed it (before any process group)
    runtime = start(argv, mode="inference", prog=PROG,
                    check=lambda config: checked.update(sampling=sampling_config(config)))
    args, cfg, sampling = runtime.config.args, runtime.config, checked["sampling"]
    acc = runtime.accelerator
    device, dtype = acc.device(), params_dtype(args)
    pred = cfg.model.predictor
    arch = predictor_config(pred.model_id, pred.params, pred.num_layers, pred.num_heads)
    tp, tp_rank = args.tensor_model_parallel_size, mpu.get_tensor_model_parallel_rank()
    osp = is_open_sora_plan(cfg)
    osp_sampler = opensoraplan.sampler_config(cfg.model.diffusion) if osp else None

    # offload_model: every model waits in host memory and comes to the device for its stage
    # (encode, denoise, decode); t5_cpu: the text encoder stays on the host
    home = torch.device("cpu") if sampling.offload_model else device

    def build_dit(weights: str, from_checkpoint: bool):
        model = build_predictor(pred.model_id, arch, transformer_config(args, arch, acc.is_cpu)).to(home).eval()
        if from_checkpoint:
            load_model(weights, [model])
        elif osp:
            load_reference_weights(model, read_weights(weights), tp_size=tp, tp_rank=tp_rank)
        else:
            load_hf_weights(model, read_weights(weights), tp_size=tp, tp_rank=tp_rank)
        if args.compile_dit_blocks:  # compiled on the first step (its time is left out of s/step)
            model.compile_blocks()
        return model

    dit = build_dit(args.load or pred.from_pretrained, args.load is not None)
    low_noise_dit = None
    if sampling.low_noise_model is not None:  # an mm checkpoint has a tracker file, a HuggingFace directory not
        low = sampling.low_noise_model
        low_noise_dit = build_dit(low, (Path(low) / "latest_checkpointed_iteration.txt").is_file())
    if sampling.dit_fsdp:  # over the ranks that run every DiT forward together
        for model in (dit, low_noise_dit):
            if model is not None:
                held = shard_parameters(model, mpu.get_context_parallel_group(), device.type)
        if torch.distributed.get_rank() == 0:
            print(f"{PROG}: dit_fsdp: the DiT's parameters sharded over {args.context_parallel_size} ranks "
                  f"({held / 2**20:.1f} MiB per rank)", flush=True)
    if osp:
        cond = _osp_conditioning(arch)
    else:
        cond = WanConditioning.from_config(arch, conditioning_task(sampling.task))
    image_encoder = None
    if not osp and cond.uses_clip:
        image = cfg.model.image_encoder
        image_encoder = ClipImageEncoder(image.from_pretrained, image.dtype or "fp32").to(home)
    vae = load_vae(cfg.model.ae, dtype).to(home)
    text = cfg.model.text_encoder[0]
    # Open-Sora-Plan's DiT masks the padded caption tokens; Wan's reads zeros there
    text_encoder = TextEncoder(text.model_id, text.from_pretrained, text.dtype or "fp32",
                               max_length=sampling.model_max_length, zero_padding=not osp)
    text_encoder.to(torch.device("cpu") if sampling.t5_cpu else home)
    if sampling.t5_fsdp:  # every rank of a TP x CP group encodes the same prompts
        held = shard_parameters(text_encoder.model, mpu.get_tensor_and_context_parallel_group(), device.type)
        if torch.distributed.get_rank() == 0:
            print(f"{PROG}: t5_fsdp: the text encoder's parameters sharded over "
                  f"{mpu.get_tensor_and_context_parallel_world_size()} ranks ({held / 2**20:.1f} MiB per rank)",
                  flush=True)
    # VAE-CP: the ranks of a VAE-CP group share each encode (I2V/FLF2V condition) and the writer's
    # group each decode
    vae_cp = (get_group("vae_cp"), get_group_ranks("vae_cp")) if cfg.sizes.vae_cp_size > 1 else None
    movable = [m for m in (dit, low_noise_dit, image_encoder, vae) if m is not None] + \
        ([] if sampling.t5_cpu else [text_encoder])

    def stage(*modules) -> None:
        """With offload_model: ``modules`` on the device, every other model on the host."""
        if not sampling.offload_model:
            return
        wanted = {id(m) for m in modules if m is not None}
        # the leaving models first, so the stage's models never share the device with them
        for m in sorted(movable, key=lambda m: id(m) in wanted):
            m.to(device if id(m) in wanted else torch.device("cpu"))
        if not acc.is_cpu:
            acc.module.empty_cache()
    rank0 = torch.distributed.get_rank() == 0
    # data-parallel replicas share the prompts; --cfg-parallel pairs of them share one prompt's branches
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    cfg_group = get_group("cfg") if args.cfg_parallel else None
    replicas, replica = (dp // 2, dp_rank // 2) if args.cfg_parallel else (dp, dp_rank)
    writer = tp_rank == 0 and mpu.get_context_parallel_rank() == 0 and (not args.cfg_parallel or dp_rank % 2 == 0)
    decoder = writer
    if vae_cp is not None:  # the writer's VAE-CP group decodes with it
        flag = torch.tensor([float(writer)], device=device)
        torch.distributed.all_reduce(flag, group=vae_cp[0])
        decoder = bool(flag.item())
    out_dir = Path(sampling.save_path)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    spatial, temporal = vae.cfg.scale_factor_spatial, vae.cfg.scale_factor_temporal
    shape = (arch.out_dim, (sampling.num_frames - 1) // temporal + 1, sampling.height // spatial,
             sampling.width // spatial)
    guided = osp_sampler.do_classifier_free_guidance if osp else _wan_guided(sampling)
    steps = osp_sampler.num_inference_steps if osp else sampling.sample_steps
    solver = osp_sampler.model_id if osp else sampling.sample_solver
    written = []
    mine = [(i, p) for i, p in enumerate(sampling.prompts) if i % replicas == replica]
    for i, prompt in tqdm(mine, desc="prompts", disable=not rank0):
        begin = time.perf_counter()
        seed = sampling.seed + i
        stage(text_encoder, image_encoder, vae)
        ids, mask = text_encoder.tokenize([prompt] + ([sampling.negative_prompt] if guided else []))
        contexts = text_encoder.encode(ids, mask).to(device, dtype)
        mask = mask.to(device)
        condition = context_image = None
        if osp and cond is not None:
            frames = load_condition_frames([sampling.images[i]], sampling.height, sampling.width).to(device)
            condition = cond.encode_images(vae, frames, sampling.num_frames, vae_cp=vae_cp).to(dtype)
        elif not osp and cond.kind != "none":
            paths = [sampling.images[i]] + ([sampling.last_images[i]] if sampling.task == "flf2v" else [])
            frames = load_condition_frames(paths, sampling.height, sampling.width).to(device)
            condition = cond.encode(vae, frames, sampling.num_frames, vae_cp=vae_cp)
            context_image = None if image_encoder is None else cond.encode_image(image_encoder, frames).to(dtype)
        references = None
        if sampling.task == "s2v":
            references = reference_latents(vae, load_reference_images(sampling.ref_images[i], sampling.height,
                                                                      sampling.width))
        # Phantom draws the noise for the video and reference frames at once and keeps the video's
        frames = shape[1] + (0 if references is None else references.shape[2])
        generator = torch.Generator().manual_seed(seed)  # the initial noise, then any sampler noise
        noise = torch.randn((1, shape[0], frames, *shape[2:]), generator=generator,
                            dtype=torch.float32)[:, :, :shape[1]]
        stage(dit, low_noise_dit)
        acc.synchronize()
        begin_denoise = time.perf_counter()
        marks = []  # after each step; s/step is over steps 2..N, as diffusers' callbacks time it

        def mark():
            acc.synchronize()
            marks.append(time.perf_counter())

        if osp:
            latents = opensoraplan.denoise(
                dit, contexts[:1], mask[:1], contexts[1:] if guided else None, mask[1:] if guided else None,
                noise.to(device), osp_sampler, dtype, generator=generator, show_progress=rank0, cfg_group=cfg_group,
                cond=cond, condition=condition, on_step=mark)
        else:
            latents = denoise(dit, contexts[:1], contexts[1:] if guided else None, noise.to(device), sampling,
                              dtype, show_progress=rank0, cfg_group=cfg_group, cond=cond, condition=condition,
                              context_image=context_image, low_noise_dit=low_noise_dit, references=references,
                              on_step=mark)
        denoise_s = time.perf_counter() - begin_denoise
        per_step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else denoise_s
        if decoder:
            stage(vae)
            video = vae.decode(vae.denormalize(latents.to(dtype)), vae_cp=vae_cp)
        if writer:
            path = output_path(out_dir, prompt, seed)
            write_mp4(path, to_frames(video[0]), sampling.fps)
            if sampling.save_latents:
                torch.save(latents.cpu(), path.with_suffix(".latents.pt"))
            written.append(path)
            print(f"{PROG}: wrote {path} ({sampling.num_frames} frames, {sampling.height}x{sampling.width}, "
                  f"{steps} {solver} steps: {per_step:.3f} s/step (steps 2-{steps}; first "
                  f"{marks[0] - begin_denoise:.3f} s); "
                  f"{time.perf_counter() - begin:.1f} s in all"
                  f"{'' if vae_cp is None else f'; decoded over {len(vae_cp[1])} VAE-CP ranks'}; peak memory "
                  f"{acc.max_memory_allocated() / 2**30:.2f} GiB)", flush=True)
    destroy_distributed()
    return written
