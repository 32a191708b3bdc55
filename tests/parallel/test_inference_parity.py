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


def _mm_worker(rank, world, mm_dir, text_dir, kwargs, solver):
    from mm.inference.config import SamplingConfig
    from mm.inference.wan import denoise
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.models.text_encoder import TextEncoder
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from mm.training.checkpointing import load_checkpoint
    from tests.wan_helpers import megatron_config

    initialize_parallel(ParallelSizes(world_size=world), seed=0)
    dit = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs)).eval()
    load_checkpoint(mm_dir, [dit], None, None, load_optim=False, load_rng=False)
    text = TextEncoder("umt5", text_dir, "fp32", max_length=16)
    contexts = text.encode(*text.tokenize([PROMPT, NEGATIVE]))
    sampling = SamplingConfig(prompts=[PROMPT], negative_prompt=NEGATIVE, sample_steps=STEPS, sample_shift=SHIFT,
                              sample_solver=solver, guidance_scale=GUIDANCE)
    shape = (1, kwargs["in_dim"], (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    latents = denoise(dit, contexts[:1], contexts[1:], noise, sampling, torch.float32, show_progress=False)
    destroy_parallel()
    return latents


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_latents_equal_diffusers_wan_pipeline(tmp_path, solver):
    import transformers
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    kwargs = tiny_kwargs(layers=2)
    _diffusers_dir(tmp_path / "hf", kwargs, seed=5)
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "mm")
    words = sorted(set((PROMPT + " " + NEGATIVE).split()))
    save_tiny_text_encoder(tmp_path / "umt5", words, d_model=kwargs["text_dim"])
    (latents,) = run_distributed(1, _mm_worker, str(tmp_path / "mm"), str(tmp_path / "umt5"), kwargs, solver)

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                        num_train_timesteps=1000) if solver == "unipc" else \
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
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
