"""mm's sampling loop against diffusers' WanPipeline on the same tiny random weights (the DiT going
through mm-convert), the same prompt, negative prompt, seed, scheduler and steps: equal latents."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.parallel.test_convert import _convert, _diffusers_dir
from tests.wan_helpers import diffusers_model, tiny_kwargs

PROMPT, NEGATIVE = "a red square moving left", "blurry static"
FRAMES, HEIGHT, WIDTH, STEPS, GUIDANCE, SHIFT, SEED = 5, 32, 48, 6, 4.0, 3.0, 7
VAE_21 = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
              latents_std=[0.5, 1.5, 1.0, 2.0])


def _tiny_assets(root, kwargs, vae: dict) -> None:
    """Under ``root``: the DiT in diffusers' layout (``hf``) and through mm-convert (``mm``), a tiny
    UMT5 (``umt5``) and a random Wan VAE of config ``vae`` (``vae``)."""
    from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    _diffusers_dir(root / "hf", kwargs, seed=5)
    _convert("hf_to_mm", root / "hf", root / "mm")
    save_tiny_text_encoder(root / "umt5", sorted(set((PROMPT + " " + NEGATIVE).split())), d_model=kwargs["text_dim"])
    torch.manual_seed(3)
    save_wan_vae(WanVAE(WanVAEConfig(**vae)), root / "vae")


def _mm_worker(rank, world, mm_dir, text_dir, kwargs, solver):
    from mm.ckpt import load_model
    from mm.inference.config import SamplingConfig
    from mm.families.wan.sampler import denoise
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.models.text_encoder import TextEncoder
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.wan_helpers import megatron_config

    initialize_parallel(ParallelSizes(world_size=world), seed=0)
    dit = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs)).eval()
    load_model(mm_dir, [dit])
    text = TextEncoder("umt5", text_dir, "fp32", max_length=16)
    contexts = text.encode(*text.tokenize([PROMPT, NEGATIVE]))
    sampling = SamplingConfig(prompts=[PROMPT], negative_prompt=NEGATIVE, sample_steps=STEPS, sample_shift=SHIFT,
                              sample_solver=solver, guidance_scale=GUIDANCE)
    shape = (1, kwargs["in_dim"], (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    latents = denoise(dit, contexts[:1], contexts[1:], noise, sampling, torch.float32, show_progress=False)
    destroy_parallel()
    return latents


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_latents_equal_diffusers_wan_pipeline(tmp_path, solver):
    import transformers
    from diffusers import (AutoencoderKLWan, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           UniPCMultistepScheduler, WanPipeline)

    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    kwargs = tiny_kwargs(layers=2)
    _diffusers_dir(tmp_path / "hf", kwargs, seed=5)
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "mm")
    words = sorted(set((PROMPT + " " + NEGATIVE).split()))
    save_tiny_text_encoder(tmp_path / "umt5", words, d_model=kwargs["text_dim"])
    (latents,) = run_distributed(1, _mm_worker, str(tmp_path / "mm"), str(tmp_path / "umt5"), kwargs, solver)

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT, num_train_timesteps=1000)
    scheduler = {"unipc": lambda: UniPCMultistepScheduler(**flow),
                 "dpm++": lambda: DPMSolverMultistepScheduler(**flow, solver_order=2, algorithm_type="dpmsolver++"),
                 "euler": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)}[solver]()
    pipe = WanPipeline(tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path / "umt5"),
                       text_encoder=transformers.UMT5EncoderModel.from_pretrained(tmp_path / "umt5"),
                       transformer=diffusers_model(kwargs, seed=5),
                       vae=AutoencoderKLWan(base_dim=8, z_dim=kwargs["in_dim"], dim_mult=[1, 2, 2, 2],
                                            num_res_blocks=1),
                       scheduler=scheduler)
    expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    assert latents.shape == expected.shape
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents, torch.zeros_like(latents))


def _mm_i2v_worker(rank, world, root, kwargs, task, height=HEIGHT, width=WIDTH):
    from mm.ckpt import load_model
    from mm.inference.config import SamplingConfig
    from mm.data.images import load_condition_frames
    from mm.families.wan.sampler import denoise
    from mm.models.ae import load_wan_vae
    from mm.models.image_encoder import ClipImageEncoder
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.models.predictor.wan.conditioning import WanConditioning
    from mm.models.text_encoder import TextEncoder
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.wan_helpers import megatron_config

    initialize_parallel(ParallelSizes(world_size=world), seed=0)
    wan = WanDiTConfig(**kwargs)
    dit = WanDiT(wan, megatron_config(kwargs)).eval()
    load_model(f"{root}/mm", [dit])
    # 512 text tokens, Wan's length: diffusers' image cross-attention takes everything before the last
    # 512 context tokens to be the image's
    text = TextEncoder("umt5", f"{root}/umt5", "fp32", max_length=512)
    contexts = text.encode(*text.tokenize([PROMPT, NEGATIVE]))
    vae = load_wan_vae(f"{root}/vae")
    cond = WanConditioning.from_config(wan, task)
    condition = image_tokens = None
    if cond.kind != "none":
        paths = [f"{root}/first.png"] + ([f"{root}/last.png"] if task == "flf2v" else [])
        frames = load_condition_frames(paths, height, width)
        condition = cond.encode(vae, frames, FRAMES)
        if cond.uses_clip:
            image_tokens = cond.encode_image(ClipImageEncoder(f"{root}/clip", "fp32"), frames)
    sampling = SamplingConfig(prompts=[PROMPT], negative_prompt=NEGATIVE, sample_steps=STEPS, sample_shift=SHIFT,
                              guidance_scale=GUIDANCE)
    spatial, temporal = vae.cfg.scale_factor_spatial, vae.cfg.scale_factor_temporal
    shape = (1, kwargs["out_dim"], (FRAMES - 1) // temporal + 1, height // spatial, width // spatial)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    latents = denoise(dit, contexts[:1], contexts[1:], noise, sampling, torch.float32, show_progress=False,
                      cond=cond, condition=condition, context_image=image_tokens)
    destroy_parallel()
    return latents, image_tokens, contexts


@pytest.mark.parametrize("task", ["i2v", "flf2v"])
def test_image_to_video_latents_equal_diffusers(tmp_path, task):
    """WanImageToVideoPipeline (first frame; FLF2V: first and last) on the same DiT, VAE and text
    encoder, given mm's CLIP tokens as image_embeds (CLIP itself is compared with transformers in
    the encoder tests)."""
    import numpy as np
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from PIL import Image

    from tests.encoder_helpers import save_clip

    kwargs = tiny_kwargs(image=True, flf2v=task == "flf2v")
    kwargs.update(in_dim=12, out_dim=4, image_dim=16)  # latents 4 + mask 4 + condition latents 4; CLIP width 16
    if task == "flf2v":
        kwargs["pos_embed_seq_len"] = 10  # 2 images x (4 patches + class token)
    _tiny_assets(tmp_path, kwargs, VAE_21)
    save_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)) for _ in range(2)]
    images[0].save(tmp_path / "first.png")
    images[1].save(tmp_path / "last.png")
    (latents, image_tokens, contexts), = run_distributed(1, _mm_i2v_worker, str(tmp_path), kwargs, task)

    pipe = WanImageToVideoPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path / "umt5"),
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(tmp_path / "umt5"),
        transformer=diffusers_model(kwargs, seed=5), vae=AutoencoderKLWan.from_pretrained(tmp_path / "vae"),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                          num_train_timesteps=1000))
    # the text embeddings as well (the text-to-video test above compares the prompt encoding itself)
    # diffusers' own CLIP preprocessing (resize the short side, centre crop) is not the original Wan's
    # (bicubic resize of the whole frame), which mm follows; give it mm's tokens, in its layout
    # (FLF2V: the two images along the batch)
    embeds = image_tokens if task == "i2v" else image_tokens.reshape(2, -1, image_tokens.shape[-1])
    pipe.encode_image = lambda image, device=None: embeds
    expected = pipe(image=images[0], last_image=images[1] if task == "flf2v" else None,
                    prompt_embeds=contexts[:1], negative_prompt_embeds=contexts[1:], height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    assert latents.shape == expected.shape
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


def _mm_experts_worker(rank, world, root, kwargs, boundary, guidance_2):
    from mm.ckpt import load_model
    from mm.inference.config import SamplingConfig
    from mm.families.wan.sampler import denoise
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.models.text_encoder import TextEncoder
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.wan_helpers import megatron_config

    initialize_parallel(ParallelSizes(world_size=world), seed=0)
    experts = []
    for name in ("high", "low"):
        dit = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs)).eval()
        load_model(f"{root}/{name}", [dit])
        experts.append(dit)
    text = TextEncoder("umt5", f"{root}/umt5", "fp32", max_length=16)
    contexts = text.encode(*text.tokenize([PROMPT, NEGATIVE]))
    sampling = SamplingConfig(prompts=[PROMPT], negative_prompt=NEGATIVE, sample_steps=STEPS, sample_shift=SHIFT,
                              guidance_scale=GUIDANCE, boundary_ratio=boundary, guidance_scale_2=guidance_2)
    shape = (1, kwargs["in_dim"], (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    latents = denoise(experts[0], contexts[:1], contexts[1:], noise, sampling, torch.float32, show_progress=False,
                      low_noise_dit=experts[1])
    destroy_parallel()
    return latents


def test_wan22_experts_switch_at_the_boundary_as_diffusers(tmp_path):
    """Wan2.2 A14B: the high-noise expert above boundary_ratio x 1000, the low-noise one (with its own
    guidance scale) below; diffusers' WanPipeline with transformer_2 and boundary_ratio agrees."""
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    kwargs = tiny_kwargs(layers=2)
    boundary, guidance_2 = 0.6, 2.0  # with shift 3, 2 of the 6 steps fall below 600
    for name, seed in (("high", 5), ("low", 6)):
        _diffusers_dir(tmp_path / f"hf_{name}", kwargs, seed=seed)
        _convert("hf_to_mm", tmp_path / f"hf_{name}", tmp_path / name)
    save_tiny_text_encoder(tmp_path / "umt5", sorted(set((PROMPT + " " + NEGATIVE).split())), d_model=kwargs["text_dim"])
    (latents,) = run_distributed(1, _mm_experts_worker, str(tmp_path), kwargs, boundary, guidance_2)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                        num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    assert 0 < int((scheduler.timesteps < boundary * 1000).sum()) < STEPS  # both experts take part
    pipe = WanPipeline(tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path / "umt5"),
                       text_encoder=transformers.UMT5EncoderModel.from_pretrained(tmp_path / "umt5"),
                       transformer=diffusers_model(kwargs, seed=5), transformer_2=diffusers_model(kwargs, seed=6),
                       boundary_ratio=boundary,
                       vae=AutoencoderKLWan(base_dim=8, z_dim=kwargs["in_dim"], dim_mult=[1, 2, 2, 2], num_res_blocks=1),
                       scheduler=scheduler)
    expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, guidance_scale_2=guidance_2,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_ti2v_latents_equal_diffusers_expand_timesteps(tmp_path, task):
    """Wan2.2 TI2V-5B (latents alone in, the Wan2.2 VAE with 16x spatial compression): text-to-video
    as WanPipeline with expand_timesteps, image-to-video as WanImageToVideoPipeline with
    expand_timesteps (latent frame 0 the clean image latent at timestep 0 on every step, and again at
    the end)."""
    import numpy as np
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from PIL import Image

    from tests.vae_helpers import VARIANTS

    height, width = 32, 64  # the VAE's 16 x the DiT's patch 2
    kwargs = tiny_kwargs(layers=2)
    _tiny_assets(tmp_path, kwargs, VARIANTS["wan2.2"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    image.save(tmp_path / "first.png")
    (latents, _, contexts), = run_distributed(1, _mm_i2v_worker, str(tmp_path), kwargs, task, height, width)

    parts = dict(tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path / "umt5"),
                 text_encoder=transformers.UMT5EncoderModel.from_pretrained(tmp_path / "umt5"),
                 transformer=diffusers_model(kwargs, seed=5), vae=AutoencoderKLWan.from_pretrained(tmp_path / "vae"),
                 scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                   flow_shift=SHIFT, num_train_timesteps=1000),
                 expand_timesteps=True)
    call = dict(prompt_embeds=contexts[:1], negative_prompt_embeds=contexts[1:], height=height, width=width,
                num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(SEED), output_type="latent")
    if task == "t2v":
        expected = WanPipeline(**parts)(**call).frames
    else:
        expected = WanImageToVideoPipeline(**parts)(image=image, **call).frames
    assert latents.shape == expected.shape == (1, kwargs["out_dim"], 2, 2, 4)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    if task == "i2v":  # the first latent frame is the image's, the rest was sampled
        assert not torch.allclose(latents[:, :, 1:], expected.new_zeros(()).expand_as(latents[:, :, 1:]))


def _mm_phantom_worker(rank, world, root, kwargs, paths, scales):
    from mm.ckpt import load_model
    from mm.inference.config import SamplingConfig
    from mm.families.wan.subject import load_reference_images, reference_latents
    from mm.families.wan.sampler import denoise
    from mm.models.ae import load_wan_vae
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.models.text_encoder import TextEncoder
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.wan_helpers import megatron_config

    initialize_parallel(ParallelSizes(world_size=world), seed=0)
    dit = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs)).eval()
    load_model(f"{root}/mm", [dit])
    text = TextEncoder("umt5", f"{root}/umt5", "fp32", max_length=16)
    contexts = text.encode(*text.tokenize([PROMPT, NEGATIVE]))
    refs = reference_latents(load_wan_vae(f"{root}/vae"), load_reference_images(paths, HEIGHT, WIDTH))
    sampling = SamplingConfig(prompts=[PROMPT], negative_prompt=NEGATIVE, sample_steps=STEPS, sample_shift=SHIFT,
                              task="s2v", guidance_scale_img=scales[0], guidance_scale_text=scales[1])
    frames = (FRAMES - 1) // 4 + 1
    noise = torch.randn((1, kwargs["in_dim"], frames + len(paths), HEIGHT // 8, WIDTH // 8),
                        generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)[:, :, :frames]
    latents = denoise(dit, contexts[:1], contexts[1:], noise, sampling, torch.float32, show_progress=False,
                      references=refs)
    destroy_parallel()
    return latents, contexts


def _phantom_reference(pipe_parts, contexts, paths, scales):
    """Phantom-Wan's subject-to-video sampler, written from its release (generate.py's
    load_ref_images, subject2video.py's loop) on diffusers' transformer, VAE and UniPC: the latents
    hold video + reference frames, the references are re-imposed (zeros for the unconditional branch)
    before every forward, the scheduler steps the whole tensor, the video frames are kept at the end."""
    import numpy as np
    from PIL import Image, ImageOps

    transformer, vae, scheduler = pipe_parts
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    refs = []
    for path in paths:
        img = Image.open(path).convert("RGB")
        ratio = img.width / img.height
        size = (WIDTH, int(WIDTH / ratio)) if ratio > WIDTH / HEIGHT else (int(HEIGHT * ratio), HEIGHT)
        img = img.resize(size, Image.Resampling.LANCZOS)
        dw, dh = WIDTH - size[0], HEIGHT - size[1]
        img = ImageOps.expand(img, border=(dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(255, 255, 255))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
        refs.append((vae.encode(x[None, :, None]).latent_dist.mean - mean) / std)
    refs = torch.cat(refs, dim=2)
    n, frames = refs.shape[2], (FRAMES - 1) // 4 + 1
    x = torch.randn((1, refs.shape[1], frames + n, HEIGHT // 8, WIDTH // 8),
                    generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            def v(latents, ctx):
                return transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=ctx,
                                   return_dict=False)[0]
            v_it = v(torch.cat([x[:, :, :-n], refs], 2), contexts[:1])
            v_i = v(torch.cat([x[:, :, :-n], refs], 2), contexts[1:])
            v_0 = v(torch.cat([x[:, :, :-n], torch.zeros_like(refs)], 2), contexts[1:])
            x = scheduler.step(v_0 + scales[0] * (v_i - v_0) + scales[1] * (v_it - v_i), t, x, return_dict=False)[0]
    return x[:, :, :-n]


def test_phantom_subject_to_video_equals_the_reference_sampler(tmp_path):
    """Two reference images of other aspect ratios than the video (one wider, one taller), two guidance
    scales: mm's s2v latents equal Phantom's sampler on diffusers' parts with the same weights."""
    import numpy as np
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from PIL import Image


    kwargs = tiny_kwargs(layers=2)
    _tiny_assets(tmp_path, kwargs, VAE_21)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(((24, 40), (36, 20))):
        paths.append(str(tmp_path / f"ref{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    scales = (3.0, 4.5)
    (latents, contexts), = run_distributed(1, _mm_phantom_worker, str(tmp_path), kwargs, paths, scales)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                        num_train_timesteps=1000)
    expected = _phantom_reference((diffusers_model(kwargs, seed=5), AutoencoderKLWan.from_pretrained(tmp_path / "vae"),
                                   scheduler), contexts, paths, scales)
    assert latents.shape == expected.shape == (1, 4, 2, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
