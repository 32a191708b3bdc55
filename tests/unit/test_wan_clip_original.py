"""Wan's image encoder release file (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth) read by mm,
against the golden outputs of the reference Wan2.1 (tests/fixtures/wan_original/make_clip_fixtures.py:
a tiny XLMRobertaCLIP, CLIPModel.visual on images of another size than the tower's)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.models.image_encoder import ClipImageEncoder
from mm.models.release_file import UnreadableFile
from mm.models.image_encoder.wan_clip import (
    check_release_state,
    clip_vision_config_from_original,
    clip_vision_state_to_original,
    expected_original_shapes,
    load_wan_clip_vision,
    original_to_clip_vision_state,
)
from tests.wan_clip_helpers import REF_ENV, golden, golden_tensors, release_state, write_release_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The tiny reference model's weights in the release file's layout."""
    return write_release_file(tmp_path_factory.mktemp("wan_clip") / "models_clip_tiny.pth", golden()["weights"])


def test_fixture_weights_are_remade_exactly():
    meta = golden()
    state = release_state(meta["weights"])
    assert {k: list(v.shape) for k, v in state.items()} == meta["weights"]
    for name, value in state.items():
        assert float(value.double().sum()) == pytest.approx(meta["weight_sums"][name], rel=1e-12, abs=1e-12), name
    assert any(k.startswith("textual.") for k in state) and "log_scale" in state


def test_loader_reproduces_the_reference_tower(release):
    model = load_wan_clip_vision(release, torch.float32)
    config, meta = model.config, golden()
    tiny = meta["config"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size,
            config.patch_size, config.intermediate_size, config.projection_dim) == (
        tiny["vision_dim"], tiny["vision_layers"], tiny["vision_heads"], tiny["image_size"], tiny["patch_size"],
        tiny["vision_dim"] * tiny["vision_mlp_ratio"], tiny["embed_dim"])
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu", 1e-5)
    assert "23 textual.*" in model.wan_clip_note and "log_scale" in model.wan_clip_note
    assert "visual.head" in model.wan_clip_note
    io = golden_tensors()
    with torch.no_grad():
        out = model(pixel_values=io["pixels"], output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out, io["tokens"], atol=1e-4, rtol=0)


def test_image_encoder_reads_the_release_file_and_preprocesses_as_wan(release):
    io, meta = golden_tensors(), golden()
    encoder = ClipImageEncoder(str(release), dtype="fp32")
    assert encoder.mean.flatten().tolist() == pytest.approx(meta["mean"]) and \
        encoder.std.flatten().tolist() == pytest.approx(meta["std"])
    assert list(io["images"].shape) == meta["images"] and meta["images"][2:] != [meta["config"]["image_size"]] * 2
    assert meta["resized_outside_unit_range"] > 0  # the resize overshoots [-1, 1]: a clamp would show
    torch.testing.assert_close(encoder.preprocess(io["images"]), io["pixels"], atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode(io["images"]), io["tokens"], atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_image_encoder_from_the_model_json_section(release):
    from mm.arguments.json_configs import ComponentConfig

    section = ComponentConfig(model_id="clip", from_pretrained=str(release), params={"num_heads": 2})
    encoder = ClipImageEncoder.from_section(section)
    assert encoder.model.dtype == torch.float32 and encoder.model.config.num_attention_heads == 2
    torch.testing.assert_close(encoder.encode(golden_tensors()["images"]), golden_tensors()["tokens"], atol=1e-4,
                               rtol=0)


def test_inverse_mapping_round_trips(release):
    state = release_state(golden()["weights"])
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    hf = original_to_clip_vision_state(state)
    assert "visual_projection.weight" in hf and not any(k.startswith(("textual", "visual.")) for k in hf)
    back = clip_vision_state_to_original(hf)
    assert set(back) == set(visual)
    for k in visual:
        assert torch.equal(back[k], visual[k]), k
    # a loaded CLIPVisionModel's own state dict (no projection), bare or under vision_model. (transformers 4,
    # diffusers' files): the release's visual tensors but visual.head
    model_state = load_wan_clip_vision(release).state_dict()
    for prefix in ("", "vision_model."):
        back = clip_vision_state_to_original({prefix + k: v for k, v in model_state.items()})
        assert set(back) == set(visual) - {"visual.head"}
        assert all(torch.equal(back[k], visual[k]) for k in back)
    with pytest.raises(ValueError, match="outside a CLIP vision model.*text_model.embeddings"):
        clip_vision_state_to_original({**model_state, "text_model.embeddings.weight": torch.zeros(1)})
    partial = {k: v for k, v in model_state.items() if k != "encoder.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"parts missing: visual.transformer.1.attn.to_qkv.weight \(has "
                                         r"encoder.layers.1.self_attn.q_proj.weight, .*v_proj.weight\)"):
        clip_vision_state_to_original(partial)


def test_the_release_names_and_shapes_make_vit_h14():
    """The full-size reference's visual.* names and shapes (built on the meta device by the generator) are
    a ViT-H/14 CLIPVisionModel, every tensor accounted for."""
    release = golden()["release"]
    assert release["other"] == ["log_scale"] and release["textual"] == 391
    state = {k: torch.empty(s, device="meta") for k, s in release["visual"].items()}
    config = clip_vision_config_from_original(state)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size,
            config.patch_size, config.intermediate_size, config.projection_dim) == (1280, 32, 16, 224, 14, 5120, 1024)
    assert expected_original_shapes(config) == release["visual"]
    state.update({f"textual.t{i}": torch.empty(1, device="meta") for i in range(3)}, log_scale=torch.empty(()))
    assert check_release_state(state, config).startswith("skipped 3 textual.* tensors (the text tower), log_scale")


def test_bad_files_are_refused_naming_them(tmp_path, release):
    key = "image_encoder.from_pretrained"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(release.read_bytes()[: release.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for bad in (truncated, text):
        with pytest.raises(UnreadableFile, match=f"{key} = '{bad}' is not a readable torch file"):
            load_wan_clip_vision(bad)
        with pytest.raises(ValueError, match=f"{key} = '{bad}'"):
            ClipImageEncoder(str(bad), "fp32")
    nested = tmp_path / "nested.pth"
    torch.save({"visual.head": torch.zeros(2, 2), "step": 3}, nested)
    with pytest.raises(ValueError, match=f"{key} = '{nested}' is not a state dict .*: entries that are not "
                                         "tensors: step"):
        load_wan_clip_vision(nested)
    with pytest.raises(FileNotFoundError, match=f"{key} = '{tmp_path / 'absent.pth'}': no such file or directory"):
        ClipImageEncoder(str(tmp_path / "absent.pth"), "fp32")

    state = release_state(golden()["weights"])
    del state["visual.transformer.1.mlp.2.bias"]
    state["visual.transformer.1.extra.weight"] = torch.zeros(3)
    state["other.tensor"] = torch.zeros(3)
    state["visual.pre_norm.bias"] = torch.zeros(7)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError) as info:
        load_wan_clip_vision(broken)
    message = str(info.value)
    assert message.startswith(f"{key} = '{broken}': the tensors do not match Wan's CLIP vision tower (3 blocks")
    assert "missing (1): visual.transformer.1.mlp.2.bias" in message
    assert "unexpected (2): other.tensor, visual.transformer.1.extra.weight" in message
    assert "misshapen (1): visual.pre_norm.bias: [7], expected [160]" in message
    with pytest.raises(ValueError, match="no visual.patch_embedding.weight, visual.pos_embedding"):
        clip_vision_config_from_original({"textual.x": torch.zeros(1)})


def test_head_count_rule(release, tmp_path):
    state = release_state(golden()["weights"])
    assert clip_vision_config_from_original(state).num_attention_heads == 2  # width 160 // 80
    assert clip_vision_config_from_original(state, num_heads=4).num_attention_heads == 4
    with pytest.raises(ValueError, match=r"image_encoder.num_heads = 3; valid: a divisor of the tower's width 160"):
        clip_vision_config_from_original(state, num_heads=3)
    narrow = {k: torch.empty(s, device="meta") for k, s in
              {"visual.patch_embedding.weight": [96, 3, 14, 14], "visual.pos_embedding": [1, 5, 96],
               "visual.transformer.0.mlp.0.weight": [384, 96], "visual.head": [96, 8]}.items()}
    with pytest.raises(ValueError, match=r"width 96 is not a multiple of 80 .* set image_encoder.num_heads \(a "
                                         r"divisor of 96\)"):
        clip_vision_config_from_original(narrow)
    assert clip_vision_config_from_original(narrow, num_heads=2).num_attention_heads == 2
    # the head count changes the output: the default (2) is the reference's
    four = ClipImageEncoder(str(release), "fp32", num_heads=4).encode(golden_tensors()["images"])
    assert (four - golden_tensors()["tokens"]).abs().max() > 1e-2
    for bad in (0, -2, "16", True):
        with pytest.raises(ValueError, match=f"image_encoder.num_heads = {bad!r}; valid: a positive integer"):
            ClipImageEncoder(str(release), "fp32", num_heads=bad)
    directory = tmp_path / "dir"
    load_wan_clip_vision(release).save_pretrained(directory)
    with pytest.raises(ValueError, match="image_encoder.num_heads = 4 but .*config.json says num_attention_heads 2"):
        ClipImageEncoder(str(directory), "fp32", num_heads=4)


def _convert(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "checkpoint", "WanConverter", "--version", "wan2.1", "clip_convert",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_clip_convert_through_the_command_line(release, tmp_path):
    target = tmp_path / "clip"
    done = _convert("--cfg.source_path", str(release), "--cfg.target_path", str(target))
    assert done.returncode == 0, done.stderr
    assert "clip_convert:" in done.stdout and "skipped 23 textual.* tensors" in done.stdout
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in target.iterdir()} == {oct(0o666 & ~_umask())}
    processor = json.loads((target / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == golden()["mean"] and processor["image_std"] == golden()["std"]
    assert processor["crop_size"] == {"height": 28, "width": 28} and processor["size"] == {"shortest_edge": 28}
    encoder = ClipImageEncoder(str(target), "fp32")
    io = golden_tensors()
    torch.testing.assert_close(encoder.encode(io["images"]), io["tokens"], atol=1e-4, rtol=0)



def test_clip_convert_errors(release, tmp_path):
    from contextlib import redirect_stderr

    from checkpoint.cli import main

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(release.read_bytes()[:1000])
    target = tmp_path / "out"
    cases = [
        (1, f"--cfg.source_path = '{truncated}' is not a readable torch file",
         "--cfg.source_path", str(truncated)),
        (2, "--num_heads = 3; valid: a divisor of the tower's width 160", "--cfg.source_path", str(release),
         "--num_heads", "3"),
        (2, "--num_heads = 0; valid: a positive integer", "--cfg.source_path", str(release), "--num_heads", "0"),
        (2, f"--cfg.source_path = '{tmp_path}': not a file", "--cfg.source_path", str(tmp_path)),
    ]
    existing = tmp_path / "existing"
    existing.mkdir()
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(["WanConverter", "--version", "wan2.1", "clip_convert", "--cfg.source_path", str(release),
              "--cfg.target_path", str(existing)])
    assert info.value.code == 2 and "exists; pass --cfg.overwrite true" in err.getvalue()
    for code, pattern, *args in cases:
        err = io.StringIO()
        with redirect_stderr(err), pytest.raises(SystemExit) as info:
            main(["WanConverter", "--version", "wan2.1", "clip_convert", *args, "--cfg.target_path", str(target)])
        assert info.value.code == code, err.getvalue()
        assert pattern in err.getvalue(), err.getvalue()
        assert not target.exists() and not (tmp_path / ".out.tmp").exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not os.environ.get(REF_ENV), reason=f"set {REF_ENV} to a checkout of Wan2.1 at 9737cba to "
                                                          "regenerate the CLIP fixture with the reference")
def test_generator_reproduces_the_committed_fixture(tmp_path):
    from safetensors.torch import load_file

    done = subprocess.run([sys.executable, str(REPO / "tests/fixtures/wan_original/make_clip_fixtures.py"), "--out",
                           str(tmp_path)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    made, committed = json.loads((tmp_path / "clip_golden.json").read_text()), golden()
    for key in ("torch", "torchvision"):
        made.pop(key), committed.pop(key)
    sums = made.pop("weight_sums"), committed.pop("weight_sums")
    overshoot = made.pop("resized_abs_max"), committed.pop("resized_abs_max")
    assert made == committed
    assert sums[0] == pytest.approx(sums[1], rel=1e-12, abs=1e-12)
    assert overshoot[0] == pytest.approx(overshoot[1], abs=1e-6)
    fresh, stored = load_file(str(tmp_path / "clip_io.safetensors")), golden_tensors()
    assert set(fresh) == set(stored)
    for name in stored:
        torch.testing.assert_close(fresh[name], stored[name], atol=1e-5, rtol=0)


def test_wan_checks_name_image_encoder_num_heads():
    """The training recipe's and the sampler's configuration checks read image_encoder.num_heads."""
    from types import SimpleNamespace

    from mm.arguments.json_configs import ComponentConfig
    from mm.families.wan.recipe import WanRecipe
    from mm.families.wan.sampler import WanSampler
    from mm.models.predictor.wan.config import WanDiTConfig

    params = json.loads((REPO / "examples/wan2.1/14b/i2v_480p/pretrain_i2v_model.json").read_text())["predictor"]
    arch = WanDiTConfig.from_json({k: v for k, v in params.items()
                                   if k not in ("model_id", "dtype", "from_pretrained")})
    for heads, problems in ((16, []), (None, []), ("16", ["image_encoder.num_heads = '16'; valid: a positive integer"]),
                            (0, ["image_encoder.num_heads = 0; valid: a positive integer"])):
        image = ComponentConfig(model_id="clip", from_pretrained="models_clip.pth",
                                params={} if heads is None else {"num_heads": heads})
        config = SimpleNamespace(
            data=SimpleNamespace(dataset_type="i2v"), args=SimpleNamespace(
                min_timestep_boundary=None, max_timestep_boundary=None, cfg_parallel=False),
            model=SimpleNamespace(predictor=SimpleNamespace(params=params), image_encoder=image, diffusion=None))
        sampling = SimpleNamespace(task="i2v", num_frames=81)
        for found in (WanRecipe.check("i2v", config, arch), WanSampler.check_sampling(config, arch, sampling, 4)):
            assert [p.split(" (")[0] for p in found] == problems
