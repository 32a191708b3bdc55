"""mm reading Wan's original VAE release files (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``) against the golden outputs of
Wan's own code (tests/fixtures/wan_original/, made by make_vae_fixtures.py there; with MM_WAN_REF / MM_WAN22_REF set,
the script is run again and must give the committed files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm.arguments.json_configs import AEConfig
from mm.models.ae import WanVAE, WanVAEConfig, load_vae, load_wan_vae, vae_factors
from mm.models.ae.wan_vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from mm.models.ae.wan_vae_original import (config_from_original, is_original_vae, name_table, read_original_vae,
                                           state_from_original, state_to_original)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "wan_original"
CASES = ("wan2.1", "wan2.2")
REF_ENV = {"wan2.1": "MM_WAN_REF", "wan2.2": "MM_WAN22_REF"}


def pth(case: str) -> Path:
    return FIXTURES / f"{case}_vae_tiny.pth"


def io(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{case}_vae_io.safetensors"))


def meta(case: str) -> dict:
    return json.loads((FIXTURES / f"{case}_vae.json").read_text())


def assert_reproduces(vae: WanVAE, case: str, decode: bool = True) -> None:
    """``vae`` gives Wan's wrapper's normalised encoder mean and its decode of it (atol 1e-4)."""
    golden = io(case)
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        mean, _ = vae.encode(golden["video"].to(dtype))
        torch.testing.assert_close(vae.normalize(mean).float(), golden["latents"], atol=1e-4, rtol=0)
        if decode:
            decoded = vae.decode(vae.denormalize(golden["latents"].to(dtype)))
            torch.testing.assert_close(decoded.float(), golden["decoded"], atol=1e-4, rtol=0)


def expected_config(args: dict, decoder_dim: int) -> dict:
    """mm's structural keys for WanVAE_(**args) of Wan2.1 (``decoder_dim`` 0) or Wan2.2 (its decoder's width)."""
    levels = len(args["dim_mult"])
    temporal = args["temperal_downsample"][:levels - 1]
    patch = 2 if decoder_dim else None
    return dict(base_dim=args["dim"], decoder_base_dim=decoder_dim if decoder_dim not in (0, args["dim"]) else None,
                z_dim=args["z_dim"], dim_mult=args["dim_mult"], num_res_blocks=args["num_res_blocks"],
                attn_scales=args["attn_scales"], temperal_downsample=temporal, is_residual=bool(decoder_dim),
                in_channels=12 if patch else 3, out_channels=12 if patch else 3, patch_size=patch,
                scale_factor_temporal=2 ** sum(temporal), scale_factor_spatial=2 ** (levels - 1) * (patch or 1))


@pytest.mark.parametrize("case", CASES)
def test_loading_the_release_file_reproduces_wan(case):
    """float64 (the golden's own float32 error is 3e-5 at most in decode), and float32 through load_vae."""
    assert is_original_vae(str(pth(case))) and not is_original_vae(str(FIXTURES))
    vae = load_wan_vae(str(pth(case)), torch.float64)
    assert not any(p.requires_grad for p in vae.parameters())
    assert_reproduces(vae, case)
    vae = load_vae(AEConfig(model_id="wan_vae", from_pretrained=str(pth(case)), dtype="fp32"))
    assert next(vae.parameters()).dtype == torch.float32
    assert_reproduces(vae, case, decode=False)


@pytest.mark.parametrize("case", CASES)
def test_default_latent_statistics_are_the_wrappers(case):
    """Wan2.1's 16 and Wan2.2's 48 values, exactly as Wan's wrappers hold them (``scale = [mean, 1 / std]``)."""
    golden = io(case)
    mean, std = (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD) if case == "wan2.1" else (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)
    assert torch.equal(torch.tensor(mean), golden["scale_mean"])
    assert torch.equal(1.0 / torch.tensor(std), golden["scale_inv_std"])
    cfg = config_from_original(read_original_vae(pth(case)))
    assert cfg.latents_mean == mean and cfg.latents_std == std


@pytest.mark.parametrize("case", CASES)
def test_structure_is_read_from_the_tensors(case):
    """The tiny fixture's and the release's (Wan's own model, on the meta device) WanVAE_ arguments."""
    info = meta(case)
    cfg = config_from_original(read_original_vae(pth(case)))
    tiny = info["wan_vae_args"]
    got = {k: getattr(cfg, k) for k in expected_config(tiny, 0)}
    assert got == expected_config(tiny, tiny.get("dec_dim", 0))
    release = {name: torch.empty(shape, device="meta") for name, shape in info["release"]["weights"].items()}
    cfg = config_from_original(release)
    # Wan2.2's WanVAE_ decodes at its default width, 256 (its wrapper does not pass dec_dim)
    want = expected_config(info["release"]["wan_vae_args"], 256 if case == "wan2.2" else 0)
    assert {k: getattr(cfg, k) for k in want} == want
    assert (cfg.scale_factor_spatial, cfg.scale_factor_temporal) == ((16, 4) if case == "wan2.2" else (8, 4))
    mm_state = state_from_original(release, cfg)
    assert list(state_to_original(mm_state, cfg)) == list(release)  # Wan's names, in Wan's order


@pytest.mark.parametrize("case", CASES)
def test_state_to_original_round_trips(case):
    original = torch.load(pth(case), weights_only=True)
    vae = load_wan_vae(str(pth(case)))
    back = state_to_original(vae.state_dict(), vae.cfg)
    assert list(back) == list(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert set(name_table(vae.cfg)) == set(vae.state_dict())
    with pytest.raises(ValueError, match=r"under mm's names.*missing \['decoder.conv_in.bias'\], unexpected \['x'\]"):
        state_to_original({**{k: v for k, v in vae.state_dict().items() if k != "decoder.conv_in.bias"},
                           "x": torch.zeros(1)}, vae.cfg)


def test_missing_unexpected_and_misshapen_weights_are_named(tmp_path):
    state = torch.load(pth("wan2.1"), weights_only=True)
    del state["decoder.upsamples.13.residual.2.bias"]
    state["decoder.upsamples.13.extra.weight"] = torch.zeros(2)
    state["encoder.middle.1.to_qkv.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as failure:
        load_wan_vae(str(tmp_path / "bad.pth"))
    message = str(failure.value)
    assert f"ae.from_pretrained = '{tmp_path / 'bad.pth'}'" in message
    assert "missing ['decoder.upsamples.13.residual.2.bias']" in message
    assert "unexpected ['decoder.upsamples.13.extra.weight']" in message
    assert "wrong shape ['encoder.middle.1.to_qkv.bias (5,) (expected (12,))']" in message


def test_unreadable_files_are_named(tmp_path):
    data = pth("wan2.2").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"ae.from_pretrained = '{tmp_path / 'cut.pth'}' is not a readable torch "
                                         r"file \(truncated or corrupt\?\)"):
        load_wan_vae(str(tmp_path / "cut.pth"))
    with pytest.raises(ValueError, match=r"ae.from_pretrained = '.*cut.pth' is not a readable torch file"):
        vae_factors(AEConfig(model_id="wan_vae", from_pretrained=str(tmp_path / "cut.pth")))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth' holds a list, not a state dict"):
        load_wan_vae(str(tmp_path / "list.pth"))
    with pytest.raises(FileNotFoundError, match=r"ae.from_pretrained = '.*none.pth': no such file"):
        load_wan_vae(str(tmp_path / "none.pth"))
    torch.save({"x.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth': not a Wan VAE state dict: no 'conv2.weight'"):
        load_wan_vae(str(tmp_path / "other.pth"))


@pytest.mark.parametrize("case, factors", [("wan2.1", (8, 4)), ("wan2.2", (16, 4))])
def test_vae_factors_of_a_release_file(case, factors):
    assert vae_factors(AEConfig(model_id="wan_vae", from_pretrained=str(pth(case)))) == factors


def test_ae_keys(tmp_path):
    """Latent statistics and tiling from the ae section; structural keys only where they agree with the tensors;
    a z_dim without Wan's statistics needs them."""
    state = read_original_vae(pth("wan2.1"))
    mean, std = [0.5] * 16, [2.0] * 16
    cfg = config_from_original(state, {"latents_mean": mean, "latents_std": std, "use_tiling": True, "z_dim": 16,
                                       "decoder_base_dim": None, "patch_size": None})
    assert cfg.latents_mean == mean and cfg.latents_std == std and cfg.use_tiling
    with pytest.raises(ValueError, match=r"ae.z_dim = 8, but the weights are those of a VAE with z_dim = 16"):
        config_from_original(state, {"z_dim": 8})
    with pytest.raises(ValueError, match=r"\['ae.base_dimm'\] are not Wan VAE parameters"):
        config_from_original(state, {"base_dimm": 8})
    with pytest.raises(ValueError, match=r"ae.latents_std has 3 values; the VAE has z_dim = 16 channels"):
        config_from_original(state, {"latents_std": [1.0] * 3})

    small = WanVAEConfig(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                         attn_scales=[0.5], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    torch.manual_seed(0)
    vae = WanVAE(small)
    torch.save(state_to_original(vae.state_dict(), small), tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"ae.latents_mean / ae.latents_std are required: .* z_dim = 4"):
        load_wan_vae(str(tmp_path / "small.pth"))
    params = {"latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [1.0, 2.0, 3.0, 4.0]}
    loaded = load_vae(AEConfig(model_id="wan_vae", from_pretrained=str(tmp_path / "small.pth"), params=params))
    assert {k: getattr(loaded.cfg, k) for k in ("base_dim", "dim_mult", "attn_scales", "temperal_downsample")} == \
        {"base_dim": 4, "dim_mult": [1, 2], "attn_scales": [0.5], "temperal_downsample": [True]}
    torch.testing.assert_close(loaded.latents_std.flatten(), torch.tensor(params["latents_std"]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))


def _convert(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "checkpoint", "WanConverter", "--version", "wan2.1", "vae_convert",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_vae_convert_command_line(tmp_path):
    source = tmp_path / "Wan2.1_VAE.pth"
    source.write_bytes(pth("wan2.1").read_bytes())
    done = _convert("--cfg.source_path", "Wan2.1_VAE.pth", "--cfg.target_path", "vae", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vae_convert: Wan2.1_VAE.pth (194 tensors, Wan2.1, z_dim 16) -> vae" in done.stdout
    written = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert written == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_reproduces(load_wan_vae(str(tmp_path / "vae"), torch.float64), "wan2.1")


def test_vae_convert_wan22_and_errors(tmp_path, capsys):
    from checkpoint.config import ConvertConfig, ConvertError, SourceDataError
    from mm.families.wan.convert import WanConverter

    converter = WanConverter("wan2.2")
    converter.vae_convert(ConvertConfig(source_path=str(pth("wan2.2")), target_path=str(tmp_path / "vae")))
    assert "(144 tensors, Wan2.2, residual, z_dim 48)" in capsys.readouterr().out
    assert_reproduces(load_wan_vae(str(tmp_path / "vae"), torch.float64), "wan2.2")
    assert oct((tmp_path / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777) == \
        oct(0o666 & ~_umask())
    with pytest.raises(ConvertError, match=r"--cfg.target_path = '.*vae' exists; pass --cfg.overwrite true"):
        converter.vae_convert(ConvertConfig(source_path=str(pth("wan2.2")), target_path=str(tmp_path / "vae")))
    converter.vae_convert(ConvertConfig(source_path=str(pth("wan2.2")), target_path=str(tmp_path / "vae"),
                                        overwrite=True))
    data = pth("wan2.2").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:1000])
    with pytest.raises(SourceDataError, match=r"--cfg.source_path = '.*cut.pth' is not a readable torch file"):
        converter.vae_convert(ConvertConfig(source_path=str(tmp_path / "cut.pth"), target_path=str(tmp_path / "x")))
    with pytest.raises(ConvertError, match=r"--cfg.source_path = '.*nothing.pth': not a file"):
        converter.vae_convert(ConvertConfig(source_path=str(tmp_path / "nothing.pth"),
                                            target_path=str(tmp_path / "x")))
    with pytest.raises(ConvertError, match=r"--latents_mean has 2 values; the VAE has z_dim = 48 channels"):
        converter.vae_convert(ConvertConfig(source_path=str(pth("wan2.2")), target_path=str(tmp_path / "x")),
                              latents_mean=[0.0, 1.0])
    assert not (tmp_path / "x").exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("case", CASES)
def test_fixture_script_gives_the_committed_files(case, tmp_path):
    if not os.environ.get(REF_ENV[case]):
        pytest.skip(f"set {REF_ENV[case]} to a checkout of Wan at the commit make_vae_fixtures.py names")
    done = subprocess.run([sys.executable, str(FIXTURES / "make_vae_fixtures.py"), "--case", case, "--out",
                           str(tmp_path)], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    made, committed = torch.load(tmp_path / pth(case).name, weights_only=True), torch.load(pth(case), weights_only=True)
    assert list(made) == list(committed) and all(torch.equal(made[k], committed[k]) for k in committed)
    made_io = load_file(str(tmp_path / f"{case}_vae_io.safetensors"))
    assert made_io.keys() == io(case).keys()
    for key, value in io(case).items():
        torch.testing.assert_close(made_io[key], value, atol=1e-5, rtol=0)
    made_meta = json.loads((tmp_path / f"{case}_vae.json").read_text())
    assert {k: v for k, v in made_meta.items() if k not in ("torch", "decoded_unclamped_share")} == \
        {k: v for k, v in meta(case).items() if k not in ("torch", "decoded_unclamped_share")}
