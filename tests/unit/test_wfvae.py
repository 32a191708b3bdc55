"""WFVAE (OpenSoraPlan 1.3) against golden outputs of the reference at 4b14d58 (fp32, CPU): encode, decode,
temporal tiling, the pipeline's latent normalisation; loading the reference's checkpoints; configs."""

from __future__ import annotations

import json

import pytest
import torch

from mm.models.ae import WFVAE, WFVAEConfig, load_vae, load_wfvae, save_wfvae, wfvae_state_dict_from_reference
from tests.wfvae_helpers import golden, tiny_wfvae

ATOL = 1e-4


@pytest.mark.parametrize("name", ["video", "image"])
def test_encode_decode_equal_the_reference(name):
    _, _, ref = golden()
    vae = tiny_wfvae()
    with torch.no_grad():
        mean, logvar = vae.encode(ref[name])
        decoded = vae.decode(ref[f"{name}_mean"])
    torch.testing.assert_close(mean, ref[f"{name}_mean"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logvar, ref[f"{name}_logvar"], atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded, ref[f"{name}_decoded"], atol=ATOL, rtol=0)
    assert decoded.abs().max() > 0.5  # informative numbers, not a collapsed output


@pytest.mark.parametrize("t_chunk_enc,t_chunk_dec", [(8, 2), (4, 1), (4, 3), (12, 2)])
def test_tiling_equals_the_reference(t_chunk_enc, t_chunk_dec):
    """Temporal chunks (the reference's tiling; 8 and 2 are its sizes) on the fixture's clip: the
    encode gives the reference's tiled encode (within 1.5e-6 of its whole-video one), the decode the
    reference's whole-video decode. The clip has 5 latent frames, an odd number, where the reference's
    own tiled decode is its whole-video decode up to fp32 rounding (the fixture records how far: 0.0
    where it was made, 3.4e-5 on another machine); for an even number of latent frames it is not, and
    mm's chunked decode follows the whole-video decode (docs/opensoraplan.md,
    test_chunked_decode_is_the_whole_video_decode)."""
    meta, _, ref = golden()
    assert meta["tiled_equals_untiled"]["decode"] <= ATOL
    vae = tiny_wfvae(use_tiling=True, t_chunk_enc=t_chunk_enc, t_chunk_dec=t_chunk_dec)
    with torch.no_grad():
        mean, _ = vae.encode(ref["video"])
        decoded = vae.decode(ref["video_mean"])
    torch.testing.assert_close(mean, ref["video_mean_tiled"], atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded, ref["video_decoded"], atol=ATOL, rtol=0)


# latent frames 3, 4, 5, 6, 8 and 24 (the released 93-frame setting, with its chunk size): odd and even counts
@pytest.mark.parametrize("frames,chunks", [(9, (1, 2, 3)), (13, (1, 2, 3)), (17, (1, 2, 3)), (21, (1, 2, 3)),
                                           (29, (1, 2, 3)), (93, (2,))], ids=["t3", "t4", "t5", "t6", "t8", "t24"])
def test_chunked_decode_is_the_whole_video_decode(frames, chunks):
    """Chunked decoding (any chunk size) equals decoding the whole video at once, for an even number of
    latent frames too (where the reference's tiled decode drops a chunk's look-ahead frame and differs
    from its whole-video decode: docs/opensoraplan.md). Twins in float64: the tiny decoder turns fp32
    rounding into up to 3e-3 at its output."""
    latents = 1 + (frames - 1) // 4
    z = torch.randn(1, 4, latents, 2, 2, generator=torch.Generator().manual_seed(frames), dtype=torch.float64)
    with torch.no_grad():
        whole = tiny_wfvae().double().decode(z)
        assert whole.shape[2] == frames
        for t_chunk_dec in chunks:
            chunked = tiny_wfvae(use_tiling=True, t_chunk_dec=t_chunk_dec).double().decode(z)
            torch.testing.assert_close(chunked, whole, atol=1e-10, rtol=0, msg=f"t_chunk_dec {t_chunk_dec}")


@pytest.mark.parametrize("frames", [17, 29])
def test_chunked_encode_is_the_whole_video_encode(frames):
    video = torch.rand(1, 3, frames, 16, 16, generator=torch.Generator().manual_seed(frames), dtype=torch.float64)
    with torch.no_grad():
        mean, logvar = tiny_wfvae().double().encode(video * 2 - 1)
        for t_chunk_enc in (4, 8, 12):
            chunked = tiny_wfvae(use_tiling=True, t_chunk_enc=t_chunk_enc).double().encode(video * 2 - 1)
            torch.testing.assert_close(chunked[0], mean, atol=1e-10, rtol=0, msg=f"t_chunk_enc {t_chunk_enc}")
            torch.testing.assert_close(chunked[1], logvar, atol=1e-10, rtol=0, msg=f"t_chunk_enc {t_chunk_enc}")


def test_latent_normalisation_and_sampling_equal_the_reference_pipeline():
    """The reference wrapper's encode: (sample - shift) * scale after torch.manual_seed(7); its decode
    undoes it (and returns [b, t, c, h, w])."""
    meta, _, ref = golden()
    vae = tiny_wfvae()
    with torch.no_grad():
        mean, logvar = vae.encode(ref["video"])
        torch.manual_seed(meta["sample_seed"])
        latents = vae.normalize(vae.sample(mean, logvar))
        video = vae.decode(vae.denormalize(ref["video_latents"]))
    torch.testing.assert_close(latents, ref["video_latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(video.transpose(1, 2), ref["video_from_latents"], atol=ATOL, rtol=0)


def test_default_normalisation_is_the_v13_pipelines():
    cfg = WFVAEConfig()
    assert cfg.scale == [0.18215] * 8 and cfg.shift == [0.0] * 8
    assert (cfg.scale_factor_temporal, cfg.scale_factor_spatial) == (4, 8)


def test_released_config_has_the_reference_parameter_count():
    """Built on the meta device; the reference counts 128 more parameters: its fixed Haar filters, which
    it stores as frozen parameters and we as constants (its trainable count is ours)."""
    meta, _, _ = golden()
    counts = meta["released_counts"]
    with torch.device("meta"):
        vae = WFVAE(WFVAEConfig.from_json(meta["released_config"]))
    assert sum(p.numel() for p in vae.parameters()) == counts["trainable"] == 147_347_660
    assert counts["parameters"] - counts["trainable"] == 2 * 8 * 8
    assert len(vae.state_dict()) == counts["state_dict_tensors"] - 40  # 40 stored Haar filters


def test_reference_checkpoint_names_map_onto_ours():
    _, state, _ = golden()
    mapped = wfvae_state_dict_from_reference(state)
    assert set(state) - set(mapped) == {k for k in state if "wavelet_transform" in k}
    assert len(set(state) - set(mapped)) == 40
    assert set(mapped) == set(tiny_wfvae().state_dict())
    # training checkpoints as the reference's init_from_ckpt reads them
    ema = {"ema_state_dict": {f"module.{k}": v + 1 for k, v in state.items() if "wavelet" not in k}, "state_dict": {}}
    assert torch.equal(wfvae_state_dict_from_reference(ema)["decoder.conv_out.weight"], state["decoder.conv_out.weight"] + 1)
    nested = {"state_dict": {"gen_model": state}}
    assert torch.equal(wfvae_state_dict_from_reference(nested)["encoder.conv_out.conv.weight"],
                       state["encoder.conv_out.conv.weight"])


def test_a_wrong_haar_filter_in_a_checkpoint_is_an_error():
    _, state, _ = golden()
    bad = dict(state)
    bad["encoder.wavelet_transform_in.g_conv.conv.weight"] = -state["encoder.wavelet_transform_in.g_conv.conv.weight"]
    with pytest.raises(ValueError, match="g_conv.conv.weight is not the Haar filter"):
        wfvae_state_dict_from_reference(bad)


def test_load_from_the_reference_layout_and_from_the_model_json(tmp_path):
    """A directory as the reference releases it (config.json + merged.ckpt), a bare .pt with the config in
    the ae section (MindSpeed-MM's vae.pt), and save_wfvae's directory all load the same weights."""
    meta, state, ref = golden()
    released = tmp_path / "vae"
    released.mkdir()
    (released / "config.json").write_text(json.dumps(dict(meta["config"], _class_name="WFVAEModel")))
    torch.save({"state_dict": state}, released / "merged.ckpt")
    torch.save(state, tmp_path / "vae.pt")

    class AE:  # the model JSON's ae section, as mm.arguments parses it
        model_id, from_pretrained, params = "wfvae", str(released), {}

    from_dir = load_vae(AE())
    from_pt = load_wfvae(str(tmp_path / "vae.pt"), params=dict(meta["config"], norm_type="aelayernorm"))
    save_wfvae(from_pt, str(tmp_path / "ours"))
    from_ours = load_wfvae(str(tmp_path / "ours"), params={"use_tiling": True})
    assert from_ours.cfg.use_tiling and not from_dir.cfg.use_tiling
    with torch.no_grad():
        for vae in (from_dir, from_pt, from_ours):
            torch.testing.assert_close(vae.encode(ref["image"])[0], ref["image_mean"], atol=ATOL, rtol=0)


def test_weights_that_do_not_match_the_config_are_an_error(tmp_path):
    meta, state, _ = golden()
    torch.save(state, tmp_path / "vae.pt")
    with pytest.raises(KeyError, match="missing .*encoder.down1.2"):
        load_wfvae(str(tmp_path / "vae.pt"), params=dict(meta["config"], encoder_num_resblocks=2))


@pytest.mark.parametrize("key,value,message", [
    ("norm_type", "groupnorm", "ae.norm_type = 'groupnorm'; valid: layernorm"),
    ("t_interpolation", "nearest", "ae.t_interpolation = 'nearest'; valid: trilinear"),
    ("l1_dowmsample_block", "Spatial2xTime2x3DDownsample", "ae.l1_dowmsample_block = .*valid: 'Downsample'"),
    ("scale", [1.0, 2.0], r"ae.scale = \[1.0, 2.0\]; valid: a list of latent_dim = 8 numbers"),
    ("t_chunk_enc", 6, "ae.t_chunk_enc = 6; valid: a positive multiple of 4"),
    ("base_channels", 0, "ae.base_channels = 0; valid: an integer >= 1"),
])
def test_bad_configs_are_clear_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        WFVAEConfig.from_json({key: value})


def test_unknown_keys_and_model_ids_are_errors():
    with pytest.raises(ValueError, match=r"ae keys \['latent_channels'\] are not WFVAE parameters"):
        WFVAEConfig.from_json({"latent_channels": 8})

    class AE:
        model_id, from_pretrained, params = "wf_vae", "x", {}

    with pytest.raises(ValueError, match="ae.model_id = 'wf_vae'; valid: wan_vae, wfvae"):
        load_vae(AE())


def test_encode_needs_1_plus_4k_frames():
    vae = tiny_wfvae()
    with pytest.raises(ValueError, match="WFVAE encodes 1 \\+ 4k frames; got 6"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
