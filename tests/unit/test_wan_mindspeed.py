"""MindSpeed-MM's layout of a Wan model JSON (``wandit``, ``wan_flow_match_scheduler``) read by mm: the keys
carried over, noted or refused by name; the scheduler's grid of timesteps and its bsmntw loss weights
(recomputed here from their definition); the DiT's ``text_len`` zero padding."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mm.arguments import ConfigError
from mm.diffusion import FlowMatching, FlowMatchingConfig
from tests.dist_helper import run_distributed
from tests.wan_helpers import mindspeed_wan_model

MINDSPEED_WAN = mindspeed_wan_model()  # MindSpeed-MM's Wan2.1 t2v predictor keys, tiny sizes


def _config(tmp_path, model: dict, *flags: str):
    """The configuration as the entry points read it (``mm.runtime.model_json_reader``: translation first)."""
    from mm.arguments import config_from_args, parse_flags
    from mm.runtime import model_json_reader

    (tmp_path / "model.json").write_text(json.dumps(model))
    return config_from_args(parse_flags(["--mm-model", str(tmp_path / "model.json"), *flags]), 1, mode="inference",
                            expand=model_json_reader())


def test_the_mindspeed_layout_becomes_mm_s_with_notes(tmp_path):
    config = _config(tmp_path, MINDSPEED_WAN)
    pred, diffusion = config.model.predictor, config.model.diffusion
    assert pred.model_id == "wan_dit" and pred.params["rope_max_seq_len"] == 1024 and pred.params["text_len"] == 16
    assert "image_dim" not in pred.params  # a t2v model's img_dim is unused
    assert pred.pipeline_num_layers is None  # a 2-stage layout, PP 1
    assert diffusion.model_id == "flow_matching"
    assert diffusion.params["timestep_grid"] == 1000 and diffusion.params["loss_weighting"] == "bsmntw"
    assert any("FPDT" in note and "kernel switches" in note for note in config.notes)
    assert any("bsmntw" in note for note in config.notes)
    i2v = json.loads(json.dumps(MINDSPEED_WAN))
    i2v["predictor"].update(model_type="i2v", in_dim=12)
    assert _config(tmp_path, i2v).model.predictor.params["image_dim"] == 1280


@pytest.mark.parametrize("key,value,message", [
    ("qk_norm", False, "predictor.qk_norm = false"),
    ("qk_norm_type", "layernorm", "predictor.qk_norm_type = 'layernorm'; valid: rmsnorm"),
    ("FPDT", True, "predictor.FPDT = true: mm has no FPDT"),
    ("model_type", "s2v", "predictor.model_type = 's2v'"),
])
def test_what_mm_cannot_do_is_refused_by_name(tmp_path, key, value, message):
    model = json.loads(json.dumps(MINDSPEED_WAN))
    model["predictor"][key] = value
    _refused(tmp_path, model, message)


def _refused(tmp_path, model: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, model)
    assert message in str(e.value)


def test_an_unknown_predictor_key_is_named(tmp_path):
    from mm.families import resolve

    model = json.loads(json.dumps(MINDSPEED_WAN))
    model["predictor"]["rope_kind"] = "3d"
    with pytest.raises(ConfigError, match="rope_kind"):
        resolve(_config(tmp_path, model).model.predictor)


def test_the_grid_and_its_bsmntw_weights():
    """The scheduler's definition: N (+1 with extra_one_step, the last dropped) sigmas from sigma_max to
    sigma_min, shifted; weights exp(-2 ((t - N/2) / N)^2) of t = 1000 sigma, less their minimum, scaled
    to sum to N."""
    n, shift, sigma_min = 1000, 5.0, 0.0
    flow = FlowMatching(FlowMatchingConfig(shift=shift, timestep_grid=n, sigma_min=sigma_min, extra_one_step=True,
                                           loss_weighting="bsmntw"))
    for i in (0, 1, 417, 999):
        s = 1.0 - i * (1.0 - sigma_min) / n
        assert flow.grid[i].item() == pytest.approx(shift * s / (1 + (shift - 1) * s), rel=1e-12)
    t = [1000 * flow.grid[i].item() for i in range(n)]
    y = [math.exp(-2 * ((x - n / 2) / n) ** 2) for x in t]
    y = [v - min(y) for v in y]
    for i in (0, 3, 500, 998):
        assert flow.grid_weights[i].item() == pytest.approx(y[i] * n / sum(y), rel=1e-9)
    assert flow.grid_weights.sum().item() == pytest.approx(n)
    # draws are grid points; the weight of a draw is its grid point's
    g = torch.Generator().manual_seed(0)
    sigmas = flow.sample_sigmas(64, generator=g)
    grid = flow.grid.float()
    assert all((grid - s).abs().min() < 1e-7 for s in sigmas)
    index = [int((grid - s).abs().argmin()) for s in sigmas]
    assert torch.allclose(flow.weights(sigmas), flow.grid_weights[index].float())
    # an expert's share: indices [int(0.9 N), N)
    high = FlowMatching(FlowMatchingConfig(shift=shift, timestep_grid=n, min_timestep=900.0, loss_weighting="bsmntw"))
    drawn = high.sample_sigmas(256, generator=g)
    assert drawn.max() <= high.grid[900].item() + 1e-7


def test_the_weighted_loss_is_each_sample_s_error_times_its_weight():
    prediction, target = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    weights = torch.tensor([0.5, 1.0, 2.0])
    expected = sum(w * ((p - t) ** 2).mean() for p, t, w in zip(prediction, target, weights)) / 3
    assert FlowMatching.loss(prediction, target, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="timestep_grid"):
        FlowMatchingConfig(loss_weighting="bsmntw")


def _padding_worker(rank, world):
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.wan_helpers import inputs, megatron_config, tiny_kwargs

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = dict(tiny_kwargs(), text_len=8)
    torch.manual_seed(0)
    model = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs, dtype=torch.float64)).double()
    x = inputs(kwargs, 2, 4, 4, dtype=torch.float64)
    short = x["context"][:, :5]
    padded = torch.cat([short, torch.zeros_like(x["context"][:, :3])], dim=1)
    with torch.no_grad():
        by_padding = model(x["latents"], x["timestep"], short)
        given_padded = model(x["latents"], x["timestep"], padded)
        model.arch = dataclasses.replace(model.arch, text_len=None)
        unpadded = model(x["latents"], x["timestep"], short)
    destroy_parallel()
    return by_padding, given_padded, unpadded


def test_text_len_pads_the_context_with_zeros():
    by_padding, given_padded, unpadded = run_distributed(1, _padding_worker)[0]
    torch.testing.assert_close(by_padding, given_padded, rtol=0, atol=0)
    # the zero tokens are attended (the text embedding has biases): without them the output differs
    assert (by_padding - unpadded).abs().max() > 1e-6


def test_mindspeed_mm_s_vae_and_text_encoder_sections(tmp_path):
    """Its feature-extraction sections (wan_video_vae with tiling, norm and sampling keys, an i2v processor
    naming the CLIP model; UMT5 with hub_backend) become mm's, the tiling in pixels."""
    model = dict(MINDSPEED_WAN, ae={
        "model_id": "wan_video_vae", "from_pretrained": "vae", "dtype": "bf16", "enable_tiling": True,
        "tiling_param": {"tile_size": [34, 34], "tile_stride": [18, 16]}, "norm_latents": True,
        "norm_mode": "channel_specified_shift_scale", "do_sample": False,
        "i2v_processor": {"processor_id": "wan_i2v_processor", "image_encoder": "clip_dir",
                          "i2v_vae_encode_tiling": "auto"}},
        text_encoder={"model_id": "UMT5", "dtype": "bf16", "hub_backend": "hf", "from_pretrained": "umt5"})
    config = _config(tmp_path, model)
    ae = config.model.ae
    assert ae.model_id == "wan_vae" and ae.params == {"use_tiling": True, "tile_sample_min_size": 272,
                                                      "tile_sample_stride": 128}
    assert config.model.image_encoder.from_pretrained == "clip_dir"
    assert config.model.text_encoder[0].params == {}
    assert any("squares of 272 pixels" in note for note in config.notes)
    for key, value, message in (("do_sample", True, "ae.do_sample = true"),
                                ("norm_latents", False, "ae.norm_latents = false")):
        bad = json.loads(json.dumps(model))
        bad["ae"][key] = value
        _refused(tmp_path, bad, message)


def test_a_vae_directory_takes_the_model_json_s_tiling_keys_and_refuses_others(tmp_path):
    from mm.models.ae import WanVAE, WanVAEConfig, load_wan_vae, save_wan_vae

    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)), tmp_path / "vae")
    vae = load_wan_vae(str(tmp_path / "vae"), params={"use_tiling": True, "tile_sample_min_size": 64, "z_dim": 4})
    assert vae.cfg.use_tiling and vae.cfg.tile_sample_min_size == 64
    with pytest.raises(ValueError, match=r"ae.z_dim = 16, but ae.from_pretrained's config.json has z_dim = 4"):
        load_wan_vae(str(tmp_path / "vae"), params={"z_dim": 16})
    with pytest.raises(ValueError, match="are not Wan VAE parameters"):
        load_wan_vae(str(tmp_path / "vae"), params={"enable_tiling": True})


def test_mindspeed_mm_s_patch_and_dynamic_dpcp_keys(tmp_path):
    """Open-Sora-Plan 1.3's MindSpeed-MM model JSON carries ``patch`` (ae_float32) and the dynamic DP/CP keys."""
    model = dict(MINDSPEED_WAN, patch={"ae_float32": True}, use_dynamic_dpcp=False, max_cp_size=4,
                 max_seq_size=54853632)
    config = _config(tmp_path, model)
    assert config.model.ae_float32
    assert any("max_cp_size, max_seq_size: read with use_dynamic_dpcp = true only" in n for n in config.notes)
    for changes, message in (({"use_dynamic_dpcp": True, "max_cp_size": 3}, "max_cp_size = 3; valid: a power of 2"),
                             ({"use_dynamic_dpcp": True, "max_seq_size": None}, "use_dynamic_dpcp = true needs "
                                                                                  "max_seq_size"),
                             ({"patch": {"ae_float32": True, "vae_fp16": 1}}, "patch.vae_fp16: unknown key")):
        _refused(tmp_path, dict(model, **changes), message)


@pytest.mark.parametrize("kind", ["wan_vae", "wfvae"])
def test_a_vae_computes_in_its_own_dtype(kind):
    """patch.ae_float32 builds the frozen VAE in fp32 in a bf16 run: it takes bf16 video and latents."""
    from mm.models.ae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    if kind == "wan_vae":
        vae = WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)).eval()
        video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    else:
        from tests.wfvae_helpers import tiny_wfvae

        vae = tiny_wfvae().eval()
        video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.encode(video.to(torch.bfloat16))
        assert mean.dtype == torch.float32
        torch.testing.assert_close(mean, vae.encode(video.to(torch.bfloat16).float())[0])
        assert vae.decode(mean.to(torch.bfloat16)).dtype == torch.float32
