"""mm's Step-Video VAE against the reference Step-Video-T2V (675e08c): the stored oracle fixture
(tests/fixtures/stepvideo/, float64, versions 2 and 1), the reference itself when MM_STEP_VIDEO_REF names
a checkout, the released VAEs' weight names and shapes, and the errors for bad sizes, configs and files."""

from __future__ import annotations

import os

import pytest
import torch

from mm.families.stepvideo.vae import (StepVideoVAE, StepVideoVAEConfig, blend_chunks, check_frames, latent_frames,
                                       load_stepvideo_vae, save_stepvideo_vae, to_release_name, vae_factors)
from tests.stepvideo_vae_helpers import (REF_ENV, case_video, filled_state, fixture_meta, fixture_outputs,
                                         mm_vae_from_fixture)

META = fixture_meta()
CASES = {case["name"]: case for case in META["cases"]}


def _tiny(version: int = 2) -> StepVideoVAE:
    return StepVideoVAE(StepVideoVAEConfig(**CASES[f"v{version}"]["config"])).double()


def test_fixture_weights_and_video_are_remade_exactly():
    for case in CASES.values():
        state = filled_state(case["weights"])
        for name, total in case["weight_sums"].items():
            assert float(state[name].sum()) == pytest.approx(total, rel=1e-12, abs=1e-12), name
        assert float(case_video(case).sum()) == pytest.approx(case["video_sum"], rel=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_reference_fixture_in_float64(name, tmp_path):
    case, ref = CASES[name], fixture_outputs()
    vae = mm_vae_from_fixture(case, tmp_path)
    video = case_video(case)
    with torch.no_grad():
        mean, logvar = vae.encode(video)
        decoded = vae.decode(mean[: case["decode_rows"]])
    torch.testing.assert_close(mean, ref[f"{name}/mean"], atol=1e-10, rtol=0)
    torch.testing.assert_close(logvar, ref[f"{name}/logvar"], atol=1e-10, rtol=0)
    # the reference's float64 decode is stored as float32 (|values| < 4: rounding below 2.4e-7)
    torch.testing.assert_close(decoded, ref[f"{name}/decoded"].double(), atol=1e-6, rtol=0)
    frames = video.shape[2]
    assert mean.shape[2] == latent_frames(frames, case["config"]["version"]) and decoded.shape[2] == frames


def test_matches_the_reference_fixture_in_float32(tmp_path):
    case, ref = CASES["v1"], fixture_outputs()
    vae = mm_vae_from_fixture(case, tmp_path, torch.float32)
    with torch.no_grad():
        mean, _ = vae.encode(case_video(case, torch.float32))
        decoded = vae.decode(mean[:1])
    assert decoded.dtype == torch.float32
    # the reference's own float32 run is within 2e-5 of its float64 one (the fixture's fp32_vs_fp64)
    torch.testing.assert_close(mean.double(), ref["v1/mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded.double(), ref["v1/decoded"].double(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", [2, 1])
def test_release_weight_names_and_shapes(version):
    with torch.device("meta"):
        vae = StepVideoVAE(StepVideoVAEConfig(version=version))
    ours = {to_release_name(k): list(v.shape) for k, v in vae.state_dict().items()}
    release = META["release"][f"v{version}"]
    assert ours == release["weights"]
    assert sum(p.numel() for p in vae.parameters()) == release["parameters"]
    assert vae.cfg.z_channels == {2: 64, 1: 16}[version]


@pytest.mark.skipif(not os.environ.get(REF_ENV), reason=f"set {REF_ENV} to a checkout of Step-Video-T2V at 675e08c "
                    "to run the reference live")
def test_matches_the_reference_live(tmp_path):
    """Three chunks (two boundaries to cross-fade), wider than high, batch 2 decoded: fresh numbers."""
    from safetensors.torch import save_file

    from tests.stepvideo_vae_helpers import import_reference, reference_shapes, reference_vae, run_reference

    ref = import_reference(os.environ[REF_ENV])
    config = dict(CASES["v2"]["config"], encoder_ch_mult=[1, 2, 2, 2], decoder_ch_mult=[2, 1, 1, 2])
    case = dict(name="live", config=config, video_shape=[2, 3, 51, 16, 32])
    case["weights"] = reference_shapes(ref, config)
    save_file(filled_state(case["weights"]), str(tmp_path / "ref.safetensors"))
    expected = run_reference(ref, reference_vae(ref, config, str(tmp_path / "ref.safetensors")), case_video(case), 2)
    vae = mm_vae_from_fixture(case, tmp_path / "ours")
    with torch.no_grad():
        mean, logvar = vae.encode(case_video(case))
        decoded = vae.decode(mean)
    torch.testing.assert_close(mean, expected["mean"], atol=1e-10, rtol=0)
    torch.testing.assert_close(logvar, expected["logvar"], atol=1e-10, rtol=0)
    torch.testing.assert_close(decoded, expected["decoded"], atol=1e-10, rtol=0)
    for version in (1, 2):
        assert reference_shapes(ref, {"version": version}) == META["release"][f"v{version}"]["weights"]


def test_frame_counts():
    assert [latent_frames(n) for n in (17, 34, 204)] == [3, 6, 36]
    assert latent_frames(34, version=1) == 10
    assert vae_factors(params={}) == (16, 8) and vae_factors(params={"version": 1}) == (8, 4)
    with pytest.raises(ValueError, match=r"num_frames = 20; valid: a positive multiple of 17 \(17, 34, 51"):
        latent_frames(20)
    with pytest.raises(ValueError) as err:
        check_frames(16, 100, 64, prefix="inference.")
    assert "inference.num_frames = 16" in str(err.value)
    assert "inference.height = 100; valid: a positive multiple of 16" in str(err.value)
    assert "width" not in str(err.value)
    check_frames(34, 24, 8, version=1)


def test_bad_sizes_are_clear_errors():
    vae = _tiny()
    with pytest.raises(ValueError, match="video num_frames = 18; valid: a positive multiple of 17"):
        vae.encode(torch.zeros(1, 3, 18, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="video width = 24; valid: a positive multiple of 16"):
        vae.encode(torch.zeros(1, 3, 17, 16, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"valid: \[b, 3, frames, height, width\]"):
        vae.encode(torch.zeros(1, 4, 17, 16, 16))
    with pytest.raises(ValueError, match=r"latents of shape \(1, 4, 4, 1, 1\); valid: \[b, 4 \(ae.z_channels\), a "
                                         "positive multiple of 3 frames"):
        vae.decode(torch.zeros(1, 4, 4, 1, 1))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"ae keys \['ch'\] are not Step-Video VAE parameters"):
        StepVideoVAEConfig.from_json({"ch": 32})
    with pytest.raises(ValueError, match="ae.version = 3; valid: 1"):
        StepVideoVAEConfig(version=3)
    with pytest.raises(ValueError, match="ae.frame_len = 16; valid: 17"):
        StepVideoVAEConfig.from_json({"frame_len": 16})
    with pytest.raises(ValueError, match=r"ae.decoder_ch = 16 x ae.decoder_ch_mult = \[1, 2, 4, 4\] gives widths "
                                         r"\[16, 32, 64, 64\]; valid: every width a multiple of 32"):
        StepVideoVAEConfig(decoder_ch=16)
    # MindSpeed-MM's keys
    cfg = StepVideoVAEConfig.from_json({"z_channels": 64, "frame_len": 17, "version": 2})
    assert (cfg.z_channels, cfg.latent_len, cfg.scale_factor_spatial) == (64, 3, 16)


def test_save_writes_release_names_and_the_loader_checks_them(tmp_path):
    from safetensors.torch import load_file, save_file

    vae = _tiny()
    weights = save_stepvideo_vae(vae, str(tmp_path / "vae"))
    assert weights.name == "vae_v2.safetensors"
    state = load_file(str(weights))
    assert "decoder.conv_out.weight" in state and "decoder.conv_out.conv.weight" not in state
    # a directory (config.json from save) or the file itself (MindSpeed-MM's from_pretrained)
    for source, params in ((tmp_path / "vae", None), (weights, CASES["v2"]["config"])):
        loaded = load_stepvideo_vae(str(source), torch.float64, params)
        for name, value in vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
        assert not any(p.requires_grad for p in loaded.parameters())

    def broken(edit, name="broken"):
        s = dict(state)
        edit(s)
        (tmp_path / name).mkdir()
        save_file(s, str(tmp_path / name / "vae_v2.safetensors"))
        return str(tmp_path / name)

    bad = broken(lambda s: s.pop("encoder.mid.attn_1.q.conv.weight"), "missing")
    with pytest.raises(KeyError, match=r"missing \['encoder.mid.attn_1.q.conv.weight'\], unexpected \[\]"):
        load_stepvideo_vae(bad, params=CASES["v2"]["config"])
    bad = broken(lambda s: s.update({"decoder.extra.weight": torch.zeros(1)}), "unexpected")
    with pytest.raises(KeyError, match=r"unexpected \['decoder.extra.weight'\]"):
        load_stepvideo_vae(bad, params=CASES["v2"]["config"])
    bad = broken(lambda s: s.update({"decoder.conv_out.bias": torch.zeros(4)}), "shape")
    with pytest.raises(KeyError, match=r"wrong shape \['decoder.conv_out.bias \(4,\) \(expected \(3,\)\)'\]"):
        load_stepvideo_vae(bad, params=CASES["v2"]["config"])
    with pytest.raises(FileNotFoundError, match=r"no vae.safetensors there \(the release's file for ae.version = 1; "
                                                r"found \['vae_v2.safetensors'\]\)"):
        load_stepvideo_vae(str(tmp_path / "vae"), params={"version": 1})
    # the tiny file read with the release's config (no config.json there): the error says which config
    with pytest.raises(KeyError, match="does not match ae.version = 2, ae.z_channels = 64"):
        load_stepvideo_vae(str(tmp_path / "missing"))


def test_blend_crossfades_each_chunk_boundary():
    a, b, c = 1.0, 2.0, 5.0
    video = torch.cat([torch.full((1, 1, 17, 1, 1), v, dtype=torch.float64) for v in (a, b, c)], dim=2)
    out = blend_chunks(video.clone())
    faded_first = 0.6 * b + 0.4 * a
    assert out[0, 0, 17, 0, 0] == pytest.approx(faded_first)
    assert out[0, 0, 16, 0, 0] == pytest.approx(0.6 * a + 0.4 * faded_first)
    assert out[0, 0, 34, 0, 0] == pytest.approx(0.6 * c + 0.4 * b)
    assert out[0, 0, 33, 0, 0] == pytest.approx(0.6 * b + 0.4 * (0.6 * c + 0.4 * b))
    untouched = [i for i in range(51) if i not in (16, 17, 33, 34)]
    torch.testing.assert_close(out[:, :, untouched], video[:, :, untouched])


def test_large_convolutions_run_in_pieces_of_frames(monkeypatch):
    from mm.families.stepvideo import vae as module

    conv = module.CausalConv3d(32, 64, 3).double()
    x = torch.randn(1, 32, 9, 4, 4, dtype=torch.float64)
    whole = conv(x)
    monkeypatch.setattr(module, "SPLIT_ELEMENTS", 1000)
    calls = []
    conv.conv.register_forward_hook(lambda m, i, o: calls.append(o.shape[2]))
    torch.testing.assert_close(conv(x), whole, atol=1e-12, rtol=0)
    assert len(calls) > 1 and sum(calls) == 9


def test_latents_are_not_scaled():
    vae, z = _tiny(), torch.randn(1, 4, 3, 1, 1)
    assert vae.normalize(z) is z and vae.denormalize(z) is z
    sample = vae.sample(z, torch.full_like(z, -30.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, z, atol=1e-5, rtol=0)
