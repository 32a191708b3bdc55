"""Wan image conditioning for training against diffusers' WanImageToVideoPipeline (prepare_latents,
encode_image) on tiny random VAEs and CLIP, and the (model, dataset) dispatcher's choices and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm.models.image_encoder import ClipImageEncoder
from mm.models.image_encoder.clip import CLIP_MEAN, CLIP_STD
from mm.models.predictor.wan.config import WanDiTConfig
from mm.models.predictor.wan.conditioning import (WanConditioning, clip_context, conditioning_kind, i2v_condition,
                                                  ti2v_condition, ti2v_image_latents)
from tests.encoder_helpers import save_clip
from tests.vae_helpers import vae_pair
from tests.wan_helpers import tiny_kwargs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def pipeline(vae, expand_timesteps=False, clip_path=None):
    """diffusers' I2V pipeline around the reference VAE (and CLIP); no text side or transformer is
    needed for prepare_latents / encode_image. Its image processor only normalises, so both sides
    see the same pixels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModel

    encoder = processor = None
    if clip_path is not None:
        encoder = CLIPVisionModel.from_pretrained(clip_path).eval()
        processor = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=True,
                                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=False)
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(), image_processor=processor,
                                   image_encoder=encoder, expand_timesteps=expand_timesteps)


def frames(batch, n, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, n, height, width, generator=g) * 2 - 1


@pytest.mark.parametrize("mode,num_frames", [("first", 1), ("first", 9), ("first_last", 5), ("first_last", 13)])
def test_i2v_condition_matches_diffusers_prepare_latents(mode, num_frames):
    ref, ours = vae_pair("wan2.1")
    pipe = pipeline(ref)
    n = 2 if mode == "first_last" else 1
    cond = frames(2, n, 16, 24)
    y = i2v_condition(ours, cond, num_frames, mode)
    f = 1 + (num_frames - 1) // 4
    assert y.shape == (2, 4 + 4, f, 2, 3) and y.dtype == torch.float32
    with torch.no_grad():
        for i in range(2):  # the pipeline encodes one image and repeats it over its batch
            _, want = pipe.prepare_latents(cond[i:i + 1, :, 0], 1, 4, 16, 24, num_frames, torch.float32,
                                           torch.device("cpu"), last_image=cond[i:i + 1, :, 1] if n == 2 else None)
            torch.testing.assert_close(y[i:i + 1], want, atol=1e-5, rtol=0)
    # the mask is informative: the first latent frame fully known, FLF2V's last one at its last sub-frame
    assert y[:, :4, 0].eq(1).all()
    if mode == "first_last":
        assert y[:, :3, -1].eq(0).all() and y[:, 3, -1].eq(1).all()


def test_i2v_dit_input_is_latents_then_mask_then_condition():
    _, ours = vae_pair("wan2.1")
    cond = frames(2, 1, 16, 24)
    wan = WanDiTConfig(**dict(tiny_kwargs(), in_dim=12))
    conditioning = WanConditioning.from_config(wan, "i2v")
    y = conditioning.encode(ours, cond, 5)
    noisy, t = torch.randn(2, 4, 2, 2, 3), torch.tensor([10.0, 900.0])
    x, timestep = conditioning.model_input(noisy, t, y)
    assert x.shape == (2, 12, 2, 2, 3) and timestep is t
    torch.testing.assert_close(x[:, :4], noisy)
    torch.testing.assert_close(x[:, 4:8], y[:, :4])
    torch.testing.assert_close(x[:, 8:], ours.normalize(ours.encode(torch.cat([cond, torch.zeros(2, 3, 4, 16, 24)], 2))[0]))
    assert conditioning.loss_frames == slice(None) and not conditioning.uses_clip


def test_i2v_condition_hands_vae_cp_to_the_vae():
    from mm.models.ae import WanVAE

    _, ours = vae_pair("wan2.1")
    seen = []

    class Recording(WanVAE):
        def encode(self, video, vae_cp=None):
            seen.append((video.shape[2], vae_cp))
            return super().encode(video)

    recording = Recording(ours.cfg)
    recording.load_state_dict(ours.state_dict())
    marker = ("group", [0, 1])
    torch.testing.assert_close(i2v_condition(recording, frames(1, 2, 16, 24), 9, "first_last", vae_cp=marker),
                               i2v_condition(ours, frames(1, 2, 16, 24), 9, "first_last"))
    assert seen == [(9, marker)]


@pytest.mark.parametrize("mode", ["first", "first_last"])
def test_clip_context_matches_diffusers_encode_image(tmp_path, mode):
    path = save_clip(tmp_path / "clip")
    encoder = ClipImageEncoder(str(path), dtype="fp32")
    ref, _ = vae_pair("wan2.1")
    pipe = pipeline(ref, clip_path=path)
    n = 2 if mode == "first_last" else 1
    cond = frames(3, n, 28, 28, seed=3)  # CLIP's own size: no resize on either side
    ours = clip_context(encoder, cond, mode)
    assert ours.shape == (3, 5 * n, 16)
    with torch.no_grad():
        for i in range(3):
            images = [(cond[i, :, j] + 1) / 2 for j in range(n)]  # the processor takes [0, 1] pixels
            want = pipe.encode_image(images if n == 2 else images[0], torch.device("cpu"))  # [n, 5, 16]
            # diffusers' FLF2V image embedder folds the pair into one sample: first tokens, then last
            torch.testing.assert_close(ours[i], want.reshape(5 * n, 16), atol=1e-5, rtol=0)


def test_ti2v_matches_diffusers_expand_timesteps():
    ref, ours = vae_pair("wan2.2")
    pipe = pipeline(ref, expand_timesteps=True)
    cond = frames(2, 1, 32, 64)
    noisy = torch.randn(2, 4, 3, 2, 4)
    t = torch.tensor([250.0, 875.0])
    image = ti2v_image_latents(ours, cond)
    assert image.shape == (2, 4, 1, 2, 4)
    out = ti2v_condition(noisy, image, t, (1, 2, 2))
    assert out.latents.shape == noisy.shape and out.timestep.shape == (2, 3 * 1 * 2)
    with torch.no_grad():
        for i in range(2):
            latents, condition, mask = pipe.prepare_latents(cond[i:i + 1, :, 0], 1, 4, 32, 64, 9, torch.float32,
                                                            torch.device("cpu"), latents=noisy[i:i + 1])
            # the pipeline's model input: the condition where the mask is 0 (latent frame 0), else the latents
            want = torch.where(mask == 0, condition, latents)
            torch.testing.assert_close(out.latents[i:i + 1], want, atol=1e-5, rtol=0)
            # its per-token timestep: the mask sampled at the (1, 2, 2) patch grid times t, flattened
            want_t = mask[0, 0, :, ::2, ::2].flatten() * t[i]
            torch.testing.assert_close(out.timestep[i], want_t)
    assert out.timestep[:, :2].eq(0).all() and out.timestep[1, 2:].eq(875.0).all()
    torch.testing.assert_close(out.latents[:, :, 1:], noisy[:, :, 1:])


def test_ti2v_image_latent_is_the_videos_first_latent_frame():
    """The VAE is causal, so conditioning on the dataset's first frame replaces latent frame 0 by its
    clean value: that frame's flow-matching target (noise - x0) cannot be predicted, hence the loss
    leaves it out."""
    _, ours = vae_pair("wan2.2")
    video = frames(2, 9, 32, 32, seed=5)
    with torch.no_grad():
        video_latents = ours.normalize(ours.encode(video)[0])
    torch.testing.assert_close(ti2v_image_latents(ours, video[:, :, :1]), video_latents[:, :, :1], atol=1e-5, rtol=0)
    wan = WanDiTConfig(**tiny_kwargs())
    conditioning = WanConditioning.from_config(wan, "i2v")
    assert conditioning.kind == "ti2v" and conditioning.loss_frames == slice(1, None)
    x, t = conditioning.model_input(torch.randn(2, 4, 3, 2, 2), torch.tensor([5.0, 6.0]),
                                    conditioning.encode(ours, video[:, :, :1], 9))
    assert t.shape == (2, 3) and t[:, 0].eq(0).all()
    torch.testing.assert_close(x[:, :, :1], video_latents[:, :, :1], atol=1e-5, rtol=0)


def test_ti2v_errors():
    image = torch.zeros(2, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="at least 2"):
        ti2v_condition(torch.zeros(2, 4, 1, 2, 2), image, torch.ones(2), (1, 2, 2))
    with pytest.raises(ValueError, match="temporal patch of 1"):
        ti2v_condition(torch.zeros(2, 4, 2, 2, 2), image, torch.ones(2), (2, 2, 2))
    with pytest.raises(ValueError, match=r"timestep of shape \(2, 4\)"):
        ti2v_condition(torch.zeros(2, 4, 2, 2, 2), image, torch.ones(2, 4), (1, 2, 2))


def test_condition_frame_errors():
    _, ours = vae_pair("wan2.1")
    with pytest.raises(ValueError, match=r"mode 'first_last' expects \[b, 3, 2, H, W\]"):
        i2v_condition(ours, frames(1, 1, 16, 16), 5, "first_last")
    with pytest.raises(ValueError, match="num_frames = 6: the Wan VAE encodes 1 \\+ 4k frames"):
        i2v_condition(ours, frames(1, 1, 16, 16), 6, "first")
    with pytest.raises(ValueError, match="conditioning mode 'last'"):
        i2v_condition(ours, frames(1, 1, 16, 16), 5, "last")


def example(path):
    params = json.loads((EXAMPLES / path).read_text())["predictor"]
    return WanDiTConfig.from_json({k: v for k, v in params.items() if k not in ("model_id", "dtype", "from_pretrained")})


@pytest.mark.parametrize("path,dataset_type,kind,clip", [
    ("wan2.1/14b/t2v/pretrain_t2v_model.json", "t2v", "none", False),
    ("wan2.1/14b/t2v/pretrain_t2v_model.json", "image", "none", False),
    ("wan2.1/14b/i2v_480p/pretrain_i2v_model.json", "i2v", "i2v", True),
    ("wan2.1/14b/flf2v/pretrain_flf2v_model.json", "flf2v", "flf2v", True),
    ("wan2.2/a14b/i2v/pretrain_i2v_high_noise_model.json", "i2v", "i2v", False),
    ("wan2.2/a14b/i2v/pretrain_i2v_low_noise_model.json", "flf2v", "flf2v", False),
    ("wan2.2/5b/ti2v/pretrain_ti2v_model.json", "i2v", "ti2v", False),
    ("wan2.2/5b/ti2v/pretrain_ti2v_model.json", "t2v", "none", False),
])
def test_dispatcher_on_the_example_models(path, dataset_type, kind, clip):
    wan = example(path)
    assert conditioning_kind(wan, dataset_type) == kind
    conditioning = WanConditioning.from_config(wan, dataset_type)
    assert (conditioning.kind, conditioning.uses_clip) == (kind, clip)
    assert conditioning.mode == {"none": None, "i2v": "first", "flf2v": "first_last", "ti2v": "first"}[kind]


@pytest.mark.parametrize("path,dataset_type,message", [
    ("wan2.1/14b/i2v_480p/pretrain_i2v_model.json", "t2v",
     r"dataset_param.dataset_type = 't2v', but predictor.in_dim = 36 .* use dataset_type 'i2v' or 'flf2v'"),
    ("wan2.2/a14b/i2v/pretrain_i2v_high_noise_model.json", "t2i", r"dataset_type = 't2i', but predictor.in_dim = 36"),
    ("wan2.1/14b/i2v_480p/pretrain_i2v_model.json", "flf2v", r"needs predictor.pos_embed_seq_len"),
    ("wan2.1/14b/flf2v/pretrain_flf2v_model.json", "i2v", r"predictor.pos_embed_seq_len = 514 .* use dataset_type 'flf2v'"),
    ("wan2.2/5b/ti2v/pretrain_ti2v_model.json", "flf2v", r"'flf2v' needs a model with condition channels .* = 100"),
    ("wan2.1/14b/t2v/pretrain_t2v_model.json", "i2v2v", r"dataset_param.dataset_type = 'i2v2v'; valid: t2v, t2i"),
])
def test_dispatcher_errors_name_the_keys(path, dataset_type, message):
    with pytest.raises(ValueError, match=message):
        WanConditioning.from_config(example(path), dataset_type)


def test_dispatcher_rejects_inconsistent_models():
    with pytest.raises(ValueError, match=r"predictor.in_dim = 20 with predictor.out_dim = 4: expected 4 .* or 12"):
        conditioning_kind(WanDiTConfig(**dict(tiny_kwargs(), in_dim=20)), "i2v")
    with pytest.raises(ValueError, match=r"predictor.image_dim = 12 .* also needs predictor.in_dim = 12"):
        conditioning_kind(WanDiTConfig(**tiny_kwargs(image=True)), "i2v")
    conditioning = WanConditioning.from_config(WanDiTConfig(**dict(tiny_kwargs(), in_dim=12)), "flf2v")
    with pytest.raises(ValueError, match="flf2v conditioning: the batch has no condition_frames"):
        conditioning.encode(None, None, 5)
    with pytest.raises(ValueError, match=r"condition y of shape \(1, 8, 3, 2, 2\) does not fit"):
        conditioning.model_input(torch.zeros(1, 4, 2, 2, 2), torch.ones(1), torch.zeros(1, 8, 3, 2, 2))
