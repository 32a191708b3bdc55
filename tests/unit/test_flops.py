"""The Wan DiT FLOPs formula against torch's FlopCounterMode on real forward/backward passes of tiny
Wan DiTs (fp32, CPU): matrix products counted by the formula and by torch agree exactly."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.wan_helpers import megatron_config, tiny_kwargs

SHAPE = (3, 4, 6)  # latent frames, height, width: 18 video tokens with patch (1, 2, 2)
TEXT_LEN, IMAGE_LEN, BATCH = 9, 5, 2


def _inputs(kwargs: dict, per_token: bool, image_len: int) -> dict:
    g = torch.Generator().manual_seed(0)
    f, h, w = SHAPE
    timestep = torch.tensor([37.0, 912.0])
    if per_token:
        timestep = timestep[:, None].repeat(1, f * h * w // 4)
    out = {"latents": torch.randn(BATCH, kwargs["in_dim"], f, h, w, generator=g), "timestep": timestep,
           "context": torch.randn(BATCH, TEXT_LEN, kwargs["text_dim"], generator=g)}
    if kwargs.get("image_dim"):
        out["context_image"] = torch.randn(BATCH, image_len, kwargs["image_dim"], generator=g)
    return out


def _measure(rank, world, variant, recompute):
    """Forward and backward FLOPs as torch counts them, with the math attention kernel (torch does not
    count the CPU flash kernel; the math one is two bmm calls it does count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = tiny_kwargs(image=variant == "i2v", flf2v=variant == "flf2v", layers=3)
    extra = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
             "block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
             "selective": dict(recompute_granularity="selective"), None: {}}[recompute]
    model = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs, **extra))
    image_len = kwargs.get("pos_embed_seq_len") or IMAGE_LEN
    x = _inputs(kwargs, per_token=variant == "ti2v_per_token", image_len=image_len)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            out = model(**x)
        with FlopCounterMode(display=False) as backward:
            out.square().mean().backward()
    destroy_parallel()
    return kwargs, image_len, forward.get_total_flops(), backward.get_total_flops()


VARIANTS = ["t2v", "i2v", "flf2v", "ti2v_per_token"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_backward_flops_equal_flop_counter(variant):
    from mm.models.predictor.wan import WanDiTConfig
    from mm.families.wan.flops import wan_forward_flops, wan_training_flops

    ((kwargs, image_len, fwd, bwd),) = run_distributed(1, _measure, variant, None)
    config = WanDiTConfig(**kwargs)
    per_token = variant == "ti2v_per_token"
    parts = wan_forward_flops(config, *SHAPE, TEXT_LEN, image_len if config.image_dim else 0, BATCH, per_token)
    assert sum(parts.values()) == fwd
    # the backward is 2x the forward except for the data gradients nobody needs: those of the first
    # products on untrained inputs (latents, the sinusoidal time embedding, the text encoder's output)
    s = SHAPE[0] * SHAPE[1] * SHAPE[2] // 4
    h = config.hidden_size
    time_rows = BATCH * (s if per_token else 1)
    unneeded = parts["patch_embedding"] + 2 * time_rows * config.freq_dim * h + 2 * BATCH * TEXT_LEN * config.text_dim * h
    assert 2 * fwd - unneeded == bwd
    assert wan_training_flops(config, *SHAPE, TEXT_LEN, image_len if config.image_dim else 0, BATCH,
                              per_token) == 3 * fwd


@pytest.mark.parametrize("recompute", ["full", "block", "selective"])
def test_recompute_adds_the_recomputed_forward(recompute):
    from mm.models.predictor.wan import WanDiTConfig
    from mm.families.wan.flops import wan_forward_flops, wan_training_flops

    ((kwargs, _, fwd, bwd),) = run_distributed(1, _measure, "t2v", recompute)
    config = WanDiTConfig(**kwargs)
    parts = wan_forward_flops(config, *SHAPE, TEXT_LEN, 0, BATCH)
    h = config.hidden_size
    unneeded = parts["patch_embedding"] + 2 * BATCH * config.freq_dim * h + 2 * BATCH * TEXT_LEN * config.text_dim * h
    # megatron's "block" method recomputes the first recompute_num_layers layers, "uniform" all of them
    layers = {"full": None, "block": 2, "selective": None}[recompute]
    expected = wan_training_flops(config, *SHAPE, TEXT_LEN, 0, BATCH,
                                  recompute="full" if recompute == "block" else recompute, recompute_layers=layers)
    assert fwd + bwd + unneeded == expected
    assert expected > 3 * fwd


def test_wan21_1_3b_worked_example_of_docs():
    """The numbers docs/flops.md works out for Wan2.1-1.3B at 81 x 480 x 832 (latent 21 x 60 x 104)."""
    from mm.models.predictor.wan import WanDiTConfig
    from mm.families.wan.flops import wan_forward_flops, wan_training_flops
    from mm.training.flops import tflops_per_device

    config = WanDiTConfig(num_layers=30, num_heads=12, hidden_size=1536, ffn_dim=8960)
    parts = wan_forward_flops(config, 21, 60, 104, 512)
    assert parts["self_attention_core"] == 30 * 4 * 32760**2 * 1536
    assert parts["ffn"] == 30 * 4 * 32760 * 1536 * 8960
    assert sum(parts.values()) == 283_001_787_777_024
    train = wan_training_flops(config, 21, 60, 104, 512)
    assert train == 849_005_363_331_072
    assert wan_training_flops(config, 21, 60, 104, 512, recompute="full") == 1_131_985_377_165_312
    # 8 data-parallel GPUs, one sample each, 10 s per iteration
    assert round(tflops_per_device(8 * train, 10.0, 8), 1) == 84.9


def test_bad_shapes_name_what_is_wrong():
    from mm.models.predictor.wan import WanDiTConfig
    from mm.families.wan.flops import wan_forward_flops, wan_training_flops
    from mm.training.flops import tflops_per_device

    config = WanDiTConfig(**tiny_kwargs())
    with pytest.raises(ValueError, match=r"latent size 3x5x6.*patch_size \[1, 2, 2\]"):
        wan_forward_flops(config, 3, 5, 6, 8)
    with pytest.raises(ValueError, match="no image branch"):
        wan_forward_flops(config, 3, 4, 6, 8, image_len=257)
    with pytest.raises(ValueError, match="give image_len"):
        wan_forward_flops(WanDiTConfig(**tiny_kwargs(image=True)), 3, 4, 6, 8)
    with pytest.raises(ValueError, match="recompute = 'ful'"):
        wan_training_flops(config, 3, 4, 6, 8, recompute="ful")
    with pytest.raises(ValueError, match="recompute_layers = 3"):
        wan_training_flops(config, 3, 4, 6, 8, recompute="full", recompute_layers=3)
    with pytest.raises(ValueError, match="seconds"):
        tflops_per_device(1e12, 0.0, 8)


def _measure_open_sora_plan(rank, world, i2v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.parallel.test_opensoraplan_dit import TINY, _config, _model

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    osp = _config(dict(TINY, vae_scale_factor_t=4) if i2v else TINY, i2v)
    model = _model(osp, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    frames, height, width = OSP_SHAPE
    x = {"latents": torch.randn(BATCH, osp.input_channels, frames, height, width, generator=g),
         "timestep": torch.tensor([37, 912]), "context": torch.randn(BATCH, TEXT_LEN, osp.caption_channels, generator=g),
         "context_mask": torch.ones(BATCH, TEXT_LEN)}
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            out = model(**x)
        with FlopCounterMode(display=False) as backward:
            out.square().mean().backward()
    destroy_parallel()
    return osp, forward.get_total_flops(), backward.get_total_flops()


OSP_SHAPE = (2, 8, 8)  # 32 tokens with patch 2: a multiple of sparse_n**2 = 16, so nothing is padded


@pytest.mark.parametrize("i2v", [False, True])
def test_open_sora_plan_flops_equal_flop_counter(i2v):
    """Dense and sparse layers (TINY: layers 2 and 3 attend within 4 groups) counted like torch does."""
    from mm.families.opensoraplan.flops import opensoraplan_forward_flops, opensoraplan_training_flops

    ((osp, fwd, bwd),) = run_distributed(1, _measure_open_sora_plan, i2v)
    parts = opensoraplan_forward_flops(osp, *OSP_SHAPE, TEXT_LEN, BATCH)
    assert sum(parts.values()) == fwd
    s, h = OSP_SHAPE[0] * OSP_SHAPE[1] * OSP_SHAPE[2] // 4, osp.hidden_size
    dense = 2 * 2 * BATCH * s * s * h  # one dense layer's q k^T and p v
    assert parts["self_attention_core"] == 2 * dense + 2 * dense // osp.sparse_n
    # the backward is 2x the forward but for the data gradients of the first products on untrained inputs
    unneeded = (parts["patch_embedding"] - (2 * 2 * BATCH * s * h * h if i2v else 0)
                + 2 * BATCH * 256 * h + 2 * BATCH * TEXT_LEN * osp.caption_channels * h)
    assert 2 * fwd - unneeded == bwd
    assert opensoraplan_training_flops(osp, *OSP_SHAPE, TEXT_LEN, BATCH) == 3 * fwd
