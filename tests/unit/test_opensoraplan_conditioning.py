"""The Open-Sora-Plan v1.3 inpainting (I2V) condition against the reference itself.

Oracle: ``opensora/utils/mask_utils.py`` of Open-Sora-Plan at 4b14d58 (mask generators, MaskProcessor,
MaskCompressor, GaussianNoiseAdder), read from a checkout of PKU-YuanGroup/Open-Sora-Plan at that commit
named by the environment variable ``MM_OPEN_SORA_PLAN_REF`` and imported with stand-in ``cv2`` /
``imageio`` modules (it imports them for its video-writing helpers only). Those tests skip when the
variable is unset (CI); the GOLDEN_* numbers below were printed by that reference code
(``reference_goldens``, run with ``random.seed(seed)`` before each ``MaskProcessor`` call) and keep
the same checks on CI; ``test_goldens_are_the_references`` re-derives them when the reference is there.
pipeline_inpaint.py / train_inpaint.py import half of the ML ecosystem, so their few lines that turn
masks into model inputs are re-stated in ``reference_*_condition`` here around the reference's classes.
The VAE is the tiny WFVAE of tests/fixtures/opensoraplan (equal to the reference's, test_wfvae.py).
"""

from __future__ import annotations

import importlib.util
import math
import random
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mm.models.predictor.opensoraplan import OpenSoraPlanDiTConfig, OpenSoraPlanI2VConfig
from mm.models.predictor.opensoraplan.conditioning import (KEYS, MASK_TYPES, MaskConfig, OpenSoraPlanConditioning,
                                                           choose_mask, compress_mask, frame_mask, masked_video,
                                                           sampling_condition, training_condition)
from tests.wfvae_helpers import tiny_wfvae

REF_ENV = "MM_OPEN_SORA_PLAN_REF"  # a checkout of PKU-YuanGroup/Open-Sora-Plan at COMMIT
COMMIT = "4b14d58"
MASK_UTILS = "opensora/utils/mask_utils.py"

V13_VIDEO = {"t2iv": 1, "i2v": 8, "transition": 8, "continuation": 2, "clear": 0, "random_temporal": 1}
V13_IMAGE = {"t2iv": 0, "clear": 0}
MIXED = {"i2v": 0, "continuation": 1, "random_temporal": 1}

# (mask type, frame mask) per seed 0.., printed by the reference (see the module docstring)
GOLDEN_V13_VIDEO = [("transition", "01111111111111110"), ("i2v", "01111111111111111"),
                    ("random_temporal", "11011111111111111"), ("i2v", "01111111111111111"),
                    ("i2v", "01111111111111111"), ("transition", "01111111111111110"),
                    ("transition", "01111111111111110"), ("i2v", "01111111111111111")]  # 17 frames, v1.3 ratios
GOLDEN_V13_IMAGE = [("clear", "0"), ("t2iv", "1"), ("clear", "0"), ("t2iv", "1"), ("t2iv", "1"), ("clear", "0")]
GOLDEN_MIXED = [("random_temporal", "0100010001101"), ("continuation", "0001111111111"),
                ("random_temporal", "1011111111110"), ("continuation", "0000000000111"),
                ("continuation", "0001111111111"), ("random_temporal", "0111110001000"),
                ("random_temporal", "0111011011111"), ("continuation", "0000111111111")]  # 13 frames, clear 0.2-0.8
GOLDEN_CASES = {"v13_video": (17, V13_VIDEO, 0.0, 1.0, GOLDEN_V13_VIDEO),
                "v13_image": (1, V13_IMAGE, 0.0, 1.0, GOLDEN_V13_IMAGE),
                "mixed": (13, MIXED, 0.2, 0.8, GOLDEN_MIXED)}
# MaskCompressor()(mask of frames "0110100111010" over 16x16)[0, :, :, i, j] for every latent pixel (i, j)
GOLDEN_COMPRESSED_BITS = "0110100111010"
GOLDEN_COMPRESSED = [[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]


def bits(mask: torch.Tensor) -> str:
    return "".join(str(int(x)) for x in mask.tolist())


def normalized(ratios: dict) -> dict:
    """inpaint_dataset.py's type_ratio_normalize, re-stated (that module imports decord, cv2, pandas ...)."""
    total = sum(ratios.values())
    return {k: 1.0 / len(ratios) for k in ratios} if total == 0 else {k: v / total for k, v in ratios.items()}


@pytest.fixture(scope="module")
def ref():
    """The reference's mask_utils module, or a skip when ``MM_OPEN_SORA_PLAN_REF`` is unset."""
    root = os.environ.get(REF_ENV)
    if not root:
        pytest.skip(f"{REF_ENV} is unset: the reference-oracle tests need a checkout of PKU-YuanGroup/Open-Sora-Plan "
                    f"at {COMMIT} (the GOLDEN_* tests cover CI)")
    source = Path(root) / MASK_UTILS
    if not source.is_file():
        pytest.fail(f"{REF_ENV}={root} has no {MASK_UTILS}: it must be a checkout of PKU-YuanGroup/Open-Sora-Plan "
                    f"at {COMMIT}")
    if (Path(root) / ".git").exists():  # a git checkout (an export of the tree has no .git to ask)
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0 and not head.stdout.strip().startswith(COMMIT):
            pytest.fail(f"{REF_ENV}={root} is at {head.stdout.strip()[:12]}, not {COMMIT}")
    stubs = {}
    for name in ("cv2", "imageio"):  # imported at the top, used only by save_mask_to_video / read_video
        if importlib.util.find_spec(name) is None and name not in sys.modules:
            stubs[name] = sys.modules[name] = types.ModuleType(name)
    try:
        spec = importlib.util.spec_from_file_location("osp_reference_mask_utils", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name in stubs:
            del sys.modules[name]
    assert module.torch_npu is None  # the CUDA/CPU branch of MaskCompressor
    return module


def reference_choice(ref, num_frames, ratios, lo, hi, seed, pixels=None):
    """MaskProcessor(min/max_clear_ratio)(pixels [T, 3, H, W], mask_type_ratio_dict=normalised ratios)
    after random.seed(seed), as Inpaint_dataset calls it, and the type it drew (re-drawn first the same
    way); the global ``random`` is left where the MaskProcessor left it."""
    table = {ref.STR_TO_TYPE[k]: v for k, v in normalized(ratios).items()}
    pixels = torch.zeros(num_frames, 3, 2, 2) if pixels is None else pixels
    random.seed(seed)
    kind = random.choices(list(table), list(table.values()))[0].name
    random.seed(seed)
    return kind, ref.MaskProcessor(min_clear_ratio=lo, max_clear_ratio=hi)(pixels, mask_type_ratio_dict=table)


def reference_goldens(ref) -> dict:
    return {name: [(k, bits(out["mask"][:, 0, 0, 0])) for k, out in
                   (reference_choice(ref, t, ratios, lo, hi, seed) for seed in range(len(golden)))]
            for name, (t, ratios, lo, hi, golden) in GOLDEN_CASES.items()}


def full_mask(frame_masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, t = frame_masks.shape
    return frame_masks[:, None, :, None, None].expand(b, 1, t, height, width).contiguous()


def pixels_and_video(batch, frames, size=16, seed=0):
    """0..255 pixels [b, T, 3, H, W] (the reference's dataset layout) and the same video [b, 3, T, H, W]
    in [-1, 1] by the reference's transform (ToTensorAfterResize, then 2x - 1)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, frames, 3, size, size), generator=g).float()
    return pixels, (2.0 * (pixels / 255.0) - 1.0).transpose(1, 2)


# ---- mask types and the per-sample choice


@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize("num_frames", [1, 2, 5, 17, 93])
@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.5, 0.5), (0.25, 0.75)])
def test_mask_generators_match_reference(ref, mask_type, num_frames, lo, hi):
    processor = ref.MaskProcessor(min_clear_ratio=lo, max_clear_ratio=hi)
    for seed in range(8):
        random.seed(seed)
        want = processor.get_mask(ref.STR_TO_TYPE[mask_type], num_frames, 3, 2, device="cpu")
        assert want.eq(want[:, :, :1, :1]).all()  # one value per frame
        rng = random.Random(seed)
        got = frame_mask(mask_type, num_frames, rng, lo, hi)
        assert got.dtype == torch.float32 and torch.equal(got, want[:, 0, 0, 0])
        assert rng.getstate() == random.getstate()  # the same draws, no more, no fewer


@pytest.mark.parametrize("ratios,num_frames", [(V13_VIDEO, 17), (V13_VIDEO, 93), (V13_IMAGE, 1), (MIXED, 29),
                                               ({"t2iv": 3, "clear": 1}, 1), ({"clear": 0, "i2v": 0}, 9)])
def test_per_sample_choice_matches_mask_processor(ref, ratios, num_frames):
    single = num_frames == 1
    cfg = MaskConfig(**{"mask_type_ratio_dict_image" if single else "mask_type_ratio_dict_video": ratios},
                     min_clear_ratio=0.1, max_clear_ratio=0.9)
    pixels = torch.rand(num_frames, 3, 4, 4) * 255
    seen = set()
    for seed in range(40):
        kind, out = reference_choice(ref, num_frames, ratios, 0.1, 0.9, seed, pixels)
        got_kind, got = choose_mask(num_frames, cfg, random.Random(seed))
        assert got_kind == kind and torch.equal(got, out["mask"][:, 0, 0, 0])
        keep = (got < 0.5)[:, None, None, None]
        assert torch.equal(out["masked_pixel_values"], pixels * keep)  # what masked_video does in [-1, 1]
        seen.add(kind)
    assert seen <= {k for k, v in normalized(ratios).items() if v > 0}


def test_goldens_are_the_references(ref):
    assert reference_goldens(ref) == {name: case[-1] for name, case in GOLDEN_CASES.items()}
    m = full_mask(torch.tensor([[float(c) for c in GOLDEN_COMPRESSED_BITS]]), 16, 16)
    assert ref.MaskCompressor()(m)[0, :, :, 1, 0].tolist() == GOLDEN_COMPRESSED


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_choice_reproduces_golden_numbers(name):
    num_frames, ratios, lo, hi, golden = GOLDEN_CASES[name]
    key = "mask_type_ratio_dict_image" if num_frames == 1 else "mask_type_ratio_dict_video"
    cfg = MaskConfig(**{key: ratios}, min_clear_ratio=lo, max_clear_ratio=hi)
    assert [(k, bits(m)) for k, m in (choose_mask(num_frames, cfg, random.Random(s)) for s in range(len(golden)))] \
        == golden


def test_defaults_are_v13_and_images_use_the_image_ratios():
    cfg = MaskConfig()
    assert cfg.mask_type_ratio_dict_video == V13_VIDEO and cfg.mask_type_ratio_dict_image == V13_IMAGE
    assert (cfg.min_clear_ratio, cfg.max_clear_ratio, cfg.add_noise_to_condition) == (0.0, 1.0, True)
    assert cfg.ratios(1) == {"t2iv": 0.5, "clear": 0.5}
    assert cfg.ratios(93) == {k: v / 20 for k, v in V13_VIDEO.items()}
    assert MaskConfig.from_json({}) == cfg
    assert set(KEYS) == {"mask_type_ratio_dict_video", "mask_type_ratio_dict_image", "min_clear_ratio",
                         "max_clear_ratio", "add_noise_to_condition"}


# ---- the compressor


@pytest.mark.parametrize("frames", [1, 5, 17, 93])
@pytest.mark.parametrize("height,width", [(16, 16), (20, 36), (64, 48), (13, 30), (100, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compress_mask_matches_mask_compressor(ref, frames, height, width, dtype):
    g = torch.Generator().manual_seed(frames * 100 + height)
    masks = torch.randint(0, 2, (3, frames), generator=g).to(dtype)
    want = ref.MaskCompressor(ae_stride_h=8, ae_stride_w=8, ae_stride_t=4)(full_mask(masks, height, width))
    got = compress_mask(masks, height, width)
    assert got.dtype == dtype and got.shape == (3, 4, 1 + (frames - 1) // 4, height // 8, width // 8)
    assert torch.equal(got, want)


def test_compress_mask_golden_numbers():
    masks = torch.tensor([[float(c) for c in GOLDEN_COMPRESSED_BITS]])
    got = compress_mask(masks, 16, 16)
    assert got.shape == (1, 4, 4, 2, 2)
    for i in range(2):
        for j in range(2):
            assert got[0, :, :, i, j].tolist() == GOLDEN_COMPRESSED
    # the layout in words: latent frame 0 is video frame 0 on every channel, then 4 frames a latent frame
    assert torch.equal(got[0, :, 0, 0, 0], masks[0, :1].expand(4))
    assert torch.equal(got[0, :, 1:, 0, 0].T.reshape(-1), masks[0, 1:])


def test_compress_mask_rejects_frames_the_vae_cannot_encode():
    with pytest.raises(ValueError, match=r"8 frames: the VAE encodes 1 \+ 4k frames"):
        compress_mask(torch.ones(1, 8), 16, 16)


# ---- the training condition


def reference_training_condition(ref, vae, pixels, seeds, cfg):
    """Inpaint_dataset.get_video (MaskProcessor, then the [-1, 1] transform) per sample, then
    train_inpaint.py's step: GaussianNoiseAdder(-3, 0.5, 0.05) when add_noise_to_condition, the VAE
    (posterior mean here, normalised), MaskCompressor. Python and torch global RNGs seeded per sample."""
    out = []
    for p, seed in zip(pixels, seeds):
        t = p.shape[0]
        ratios = cfg.mask_type_ratio_dict_image if t == 1 else cfg.mask_type_ratio_dict_video
        torch.manual_seed(seed)
        _, data = reference_choice(ref, t, ratios, cfg.min_clear_ratio, cfg.max_clear_ratio, seed, p)
        # [1, 3, T, H, W] and [1, 1, T, H, W], contiguous as the collated batch (randn_like follows strides)
        masked = (2.0 * (data["masked_pixel_values"] / 255.0) - 1.0).transpose(0, 1)[None].contiguous()
        mask = data["mask"].transpose(0, 1)[None].contiguous()
        if cfg.add_noise_to_condition:
            masked = ref.GaussianNoiseAdder(mean=-3.0, std=0.5, clear_ratio=0.05)(masked, mask)
        out.append(torch.cat([vae.normalize(vae.encode(masked)[0]), ref.MaskCompressor()(mask)], dim=1))
    return torch.cat(out)


@pytest.mark.parametrize("frames", [1, 9])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("ratios", [V13_VIDEO, MIXED])
def test_training_condition_matches_reference(ref, frames, noise, ratios):
    vae = tiny_wfvae()
    cfg = MaskConfig(mask_type_ratio_dict_video=ratios, mask_type_ratio_dict_image={"t2iv": 1, "clear": 1},
                     add_noise_to_condition=noise, min_clear_ratio=0.2, max_clear_ratio=0.8)
    pixels, video = pixels_and_video(3, frames)
    seeds = [4, 42, 2024]  # 42 skips the noise in three of the four cases (its draw after the mask is < 0.05)
    got, kinds = training_condition(vae, video, seeds, cfg)
    assert got.shape == (3, 4 + 4, 1 + (frames - 1) // 4, 2, 2) and got.dtype == torch.float32
    assert kinds == [choose_mask(frames, cfg, random.Random(s))[0] for s in seeds]
    want = reference_training_condition(ref, vae, pixels, seeds, cfg)
    assert torch.equal(got[:, 4:], want[:, 4:])  # the mask: exact
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # batched vs per-sample VAE: an ulp or so


def test_training_condition_by_the_formulas():
    """CI's version of the above: the masked video, noise and compression re-stated, no reference."""
    vae = tiny_wfvae()
    cfg = MaskConfig(mask_type_ratio_dict_video=MIXED, min_clear_ratio=0.2, max_clear_ratio=0.8)
    _, video = pixels_and_video(2, 13)
    seeds = [3, 6]
    state, torch_state = random.getstate(), torch.random.get_rng_state()
    got, kinds = training_condition(vae, video, seeds, cfg)
    assert random.getstate() == state and torch.equal(torch.random.get_rng_state(), torch_state)
    assert kinds == ["continuation", "random_temporal"]  # GOLDEN_MIXED
    want = []
    for i, seed in enumerate(seeds):
        rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
        mask = torch.tensor([float(c) for c in GOLDEN_MIXED[seed][1]])
        choose_mask(13, cfg, rng)  # the draws before the noise's skip
        keep = (mask == 0)[None, :, None, None]
        x = torch.where(keep, video[i], torch.tensor(-1.0))
        if rng.random() >= 0.05:  # seed 3 draws 0.13: noise; seed 6 draws 0.0005: none
            sigma = math.exp(torch.normal(-3.0, 0.5, size=(1,), generator=g).item())
            x = x + torch.where(keep, torch.randn(x.shape, generator=g) * sigma, torch.tensor(0.0))
        latents = vae.normalize(vae.encode(x[None])[0])
        want.append(torch.cat([latents, compress_mask(mask[None], 16, 16)], dim=1))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
    again, _ = training_condition(vae, video, seeds, cfg)
    assert torch.equal(again, got)
    other, _ = training_condition(vae, video, [3, 7], cfg)
    assert torch.equal(other[0], got[0]) and not torch.equal(other[1], got[1])


def test_training_condition_can_draw_from_the_posterior():
    vae = tiny_wfvae()
    cfg = MaskConfig(mask_type_ratio_dict_video={"i2v": 1}, add_noise_to_condition=False)
    _, video = pixels_and_video(2, 5)
    got, _ = training_condition(vae, video, [1, 2], cfg, sample_posterior=True)
    mean, logvar = vae.encode(masked_video(video, torch.tensor([[0.0, 1, 1, 1, 1]] * 2)))
    want = [vae.normalize(vae.sample(mean[i:i + 1], logvar[i:i + 1], torch.Generator().manual_seed(s)))
            for i, s in enumerate([1, 2])]
    torch.testing.assert_close(got[:, :4], torch.cat(want), atol=1e-5, rtol=1e-5)


def test_training_condition_errors():
    vae = tiny_wfvae()
    _, video = pixels_and_video(2, 5)
    with pytest.raises(ValueError, match="1 seeds for a batch of 2 videos"):
        training_condition(vae, video, [1], MaskConfig())
    with pytest.raises(ValueError, match=r"4 frames: the VAE encodes 1 \+ 4k"):
        training_condition(vae, video[:, :, :4], [1, 2], MaskConfig())
    with pytest.raises(ValueError, match="12x16: height and width must be multiples of the VAE's 8"):
        training_condition(vae, video[..., :12, :], [1, 2], MaskConfig())


# ---- the sampling condition


def reference_sampling_condition(ref, vae, pixels, indices, num_frames, noise_strength, seed):
    """OpenSoraInpaintPipeline.get_masked_pixel_values_mask for condition images ([n, 3, H, W], 0..255,
    n < num_frames), batch 1, no classifier-free guidance: the torch global RNG seeded with ``seed``."""
    n, _, height, width = pixels.shape
    inputs = torch.zeros(num_frames, 3, height, width)
    mask = torch.ones(num_frames, 1, height, width)
    inputs[indices] = pixels
    mask[indices] = 0
    masked = 2.0 * ((inputs * (mask < 0.5)) / 255.0) - 1.0
    masked, mask = masked[None].transpose(1, 2).contiguous(), mask[None].transpose(1, 2).contiguous()
    if noise_strength:
        torch.manual_seed(seed)
        masked = ref.GaussianNoiseAdder(mean=math.log(noise_strength), std=0.01, clear_ratio=0)(masked, mask)
    return torch.cat([vae.normalize(vae.encode(masked)[0]), ref.MaskCompressor()(mask)], dim=1)


@pytest.mark.parametrize("indices,num_frames", [([0], 9), ([0, -1], 9), ([0, 4, 8], 13), ([3], 5)])
@pytest.mark.parametrize("noise_strength", [0.0, 0.1])
def test_sampling_condition_matches_pipeline(ref, indices, num_frames, noise_strength):
    vae = tiny_wfvae()
    pixels, video = pixels_and_video(1, len(indices), seed=5)
    given = None if indices in ([0], [0, -1]) else indices  # one image / two: the pipeline's default places
    got = sampling_condition(vae, video, num_frames, given, noise_strength=noise_strength,
                             generator=torch.Generator().manual_seed(9))
    want = reference_sampling_condition(ref, vae, pixels[0], indices, num_frames, noise_strength, 9)
    assert got.shape == (1, 8, 1 + (num_frames - 1) // 4, 2, 2)
    assert torch.equal(got[:, 4:], want[:, 4:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sampling_i2v_is_training_i2v():
    """One image at frame 0 gives the condition training builds for an i2v mask of a video starting with it."""
    vae = tiny_wfvae()
    _, video = pixels_and_video(2, 9)
    cfg = MaskConfig(mask_type_ratio_dict_video={"i2v": 1}, add_noise_to_condition=False)
    train, kinds = training_condition(vae, video, [0, 1], cfg)
    sample = sampling_condition(vae, video[:, :, :1], 9)
    assert kinds == ["i2v", "i2v"]
    torch.testing.assert_close(sample, train, atol=1e-5, rtol=1e-5)
    assert sample[:, 4:, 0].eq(0).all() and sample[:, 4:, 1:].eq(1).all()
    transition = sampling_condition(vae, video[:, :, [0, 8]], 9)  # first and last by default
    assert transition[:, 4:7, -1].eq(1).all() and transition[:, 7, -1].eq(0).all()


@pytest.mark.parametrize("n,indices,kwargs,message", [
    (3, None, {}, "3 condition images: give their frame positions"),
    (1, [0, 4], {}, "2 positions for 1 condition images"),
    (1, [9], {}, "9 is not a frame of a 9-frame video"),
    (2, [8, -1], {}, r"frames \[8, 8\] repeat"),
    (1, None, {"noise_strength": 1.5}, r"noise_strength = 1.5; valid: a number in \[0, 1\]"),
    (1, None, {"noise_strength": 0.1}, "pass a generator"),
])
def test_sampling_condition_errors(n, indices, kwargs, message):
    vae = tiny_wfvae()
    _, video = pixels_and_video(1, n)
    with pytest.raises(ValueError, match=message):
        sampling_condition(vae, video, 9, indices, **kwargs)


# ---- configuration and the DiT input


def i2v_predictor(**kw):
    return OpenSoraPlanI2VConfig(**dict(dict(num_layers=2, num_heads=2, head_dim=12, in_channels=4,
                                             caption_channels=16, vae_scale_factor_t=4), **kw))


def test_conditioning_builds_the_dit_input():
    vae = tiny_wfvae()
    predictor = i2v_predictor()
    cond = OpenSoraPlanConditioning.from_config(predictor, {"mask_type_ratio_dict_video": {"transition": 1},
                                                            "add_noise_to_condition": False})
    assert cond.masks.mask_type_ratio_dict_video == {"transition": 1} and not cond.uses_clip
    _, video = pixels_and_video(2, 9)
    y = cond.encode(vae, video, [5, 6])
    torch.testing.assert_close(y, cond.encode_images(vae, video[:, :, [0, 8]], 9), atol=1e-5, rtol=1e-5)
    noisy, t = torch.randn(2, 4, 3, 2, 2, dtype=torch.bfloat16), torch.tensor([3.0, 999.0])
    x, timestep = cond.model_input(noisy, t, y)
    assert x.shape == (2, predictor.input_channels, 3, 2, 2) and x.dtype == torch.bfloat16 and timestep is t
    assert torch.equal(x[:, :4], noisy) and torch.equal(x[:, 4:], y.to(torch.bfloat16))
    assert cond.loss_frames == slice(None)
    with pytest.raises(ValueError, match=r"expected \[b, 4, f, h, w\] and \[2, 8, 3, 2, 2\]"):
        cond.model_input(noisy, t, y[:, :, :2])


def test_conditioning_checks_model_and_vae():
    t2v = OpenSoraPlanDiTConfig(num_layers=2, num_heads=2, head_dim=12, in_channels=4, caption_channels=16)
    with pytest.raises(ValueError, match="'videoditsparse' has no condition channels.*videoditsparsei2v"):
        OpenSoraPlanConditioning.from_config(t2v)
    cond = OpenSoraPlanConditioning.from_config(i2v_predictor(in_channels=8))
    _, video = pixels_and_video(1, 5)
    with pytest.raises(ValueError, match="ae latent_dim = 4 .* predictor.in_channels = 8"):
        cond.encode(tiny_wfvae(), video, [0])


@pytest.mark.parametrize("params,message", [
    ({"mask_type_ratio_dict_video": {"i2v": 1, "random_spatial": 1}},
     "dataset_param.mask_type_ratio_dict_video.random_spatial: unknown mask type; valid: t2iv, i2v, transition"),
    ({"mask_type_ratio_dict_video": {"i2v": -1}},
     "dataset_param.mask_type_ratio_dict_video.i2v = -1; valid: a number >= 0"),
    ({"mask_type_ratio_dict_image": {}}, r"dataset_param.mask_type_ratio_dict_image = \{\}; valid: an object"),
    ({"mask_type_ratio_dict_image": {"clear": True}}, "mask_type_ratio_dict_image.clear = True; valid: a number"),
    ({"min_clear_ratio": 1.5}, r"dataset_param.min_clear_ratio = 1.5; valid: a number in \[0, 1\]"),
    ({"min_clear_ratio": 0.6, "max_clear_ratio": 0.4}, "min_clear_ratio = 0.6 > dataset_param.max_clear_ratio = 0.4"),
    ({"add_noise_to_condition": "yes"}, "add_noise_to_condition = 'yes'; valid: true or false"),
    ({"mask_type": "i2v"}, "dataset_param.mask_type: not mask settings; valid: mask_type_ratio_dict_video"),
])
def test_config_errors_name_key_value_and_valid(params, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig.from_json(params)


def test_config_errors_name_the_section_given():
    with pytest.raises(ValueError, match="predictor.max_clear_ratio = 2"):
        OpenSoraPlanConditioning.from_config(i2v_predictor(), {"max_clear_ratio": 2}, where="predictor")
