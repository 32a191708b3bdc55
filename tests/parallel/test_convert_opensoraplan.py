"""mm-convert OpenSoraPlanConverter --version v1.3: the reference release's DiT directory -> mm
shards (TP / PP / PP x VPP) -> resplit -> back is bit-exact; converted shards load into the model
under the same layout and reproduce the reference's golden outputs; the released VAE checkpoint
becomes a vae.pt that ae.from_pretrained reads; bad input fails before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.dist_helper import run_distributed

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "opensoraplan"
_I2V_KEYS = ("pos_embed_masked_hidden_states", "pos_embed_mask")


def _golden() -> dict:
    return json.loads((FIXTURES / "dit_golden.json").read_text())


def _reference_state(variant: str) -> dict[str, torch.Tensor]:
    """The tiny reference model's state dict (the I2V model; T2V lacks the mask embeddings)."""
    state = load_file(str(FIXTURES / "dit_weights.safetensors"))
    return state if variant == "i2v" else {k: v for k, v in state.items() if not k.startswith(_I2V_KEYS)}


def _release(root: Path, variant: str, names=lambda k: k) -> dict[str, torch.Tensor]:
    """A release DiT directory as the reference's save_pretrained writes it (config.json with its
    class and arguments, diffusion_pytorch_model.safetensors); returns its tensors."""
    meta = _golden()
    state = _reference_state(variant)
    root.mkdir(parents=True)
    save_file({names(k): v for k, v in state.items()}, str(root / "diffusion_pytorch_model.safetensors"))
    config = dict(meta["tiny_config"], _class_name="OpenSoraInpaint_v1_3" if variant == "i2v" else "OpenSoraT2V_v1_3",
                  _diffusers_version="0.30.2", dropout=0.0, only_cross_attention=False, upcast_attention=False)
    if variant == "i2v":
        config["vae_scale_factor_t"] = meta["vae_scale_factor_t"]
    (root / "config.json").write_text(json.dumps(config))
    return state


def _convert(verb: str, source, target, tp: int | None = None, pp_layers=None, **extra) -> None:
    from checkpoint.config import ConvertConfig, ParallelConfig
    from mm.families.opensoraplan.convert import OpenSoraPlanConverter

    parallel = {} if tp is None and pp_layers is None else {
        "target_parallel_config": ParallelConfig(tp_size=tp or 1, pp_layers=pp_layers or [])}
    cfg = ConvertConfig(source_path=str(source), target_path=str(target), **parallel, **extra)
    getattr(OpenSoraPlanConverter("v1.3"), verb)(cfg)


def _files(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): torch.load(p, weights_only=False) for p in sorted(root.rglob("*.pt"))}


# name -> (tp_size, pp_layers) on the 4-layer tiny model; a row of pp_layers per virtual chunk
TARGETS = {"tp2": (2, []), "pp2_uneven": (1, [1, 3]), "tp2_pp2_vpp2": (2, [[1, 1], [1, 1]])}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_round_trip_is_bit_exact(tmp_path, variant, target):
    original = _release(tmp_path / "93x480p", variant)
    tp, pp_layers = TARGETS[target]
    _convert("hf_to_mm", tmp_path / "93x480p", tmp_path / "split", tp=tp, pp_layers=pp_layers)
    files = _files(tmp_path / "split")
    pp = 1 if not pp_layers else len(pp_layers[0]) if isinstance(pp_layers[0], list) else len(pp_layers)
    names = [f"mp_rank_{t:02d}_{s:03d}" if pp > 1 else f"mp_rank_{t:02d}" for t in range(tp) for s in range(pp)]
    assert sorted(files) == sorted(f"release/{n}/model_optim_rng.pt" for n in names)
    header = json.loads((tmp_path / "split" / "release" / "checkpoint.json").read_text())
    assert header["extra"]["predictor"]["vae_scale_factor_t"] == (4 if variant == "i2v" else None)
    assert header["extra"]["pipeline_layers"] == (pp_layers or [4])
    first = files[f"release/{names[0]}/model_optim_rng.pt"]
    chunk = "model0" if target == "tp2_pp2_vpp2" else "model"
    assert ("masked_video_embedding.linear.weight" in first[chunk]) == (variant == "i2v")
    if tp == 2:  # real halves: the ranks hold different q/k/v rows
        qkv = [files[f"release/{n}/model_optim_rng.pt"][chunk]["blocks.0.self_attention.linear_qkv.weight"]
               for n in names[::pp]]
        assert qkv[0].shape == (3 * 24 // 2, 24) and not torch.equal(*qkv)
    # MindSpeed-MM's resplit: source and target only, merged into one TP1 file; its example passes the
    # release directory itself, which gives the same tensors as hf_to_mm at TP1
    _convert("resplit", tmp_path / "split", tmp_path / "merged")
    assert sorted(_files(tmp_path / "merged")) == ["release/mp_rank_00/model_optim_rng.pt"]
    _convert("resplit", tmp_path / "93x480p", tmp_path / "from_release")
    merged, from_release = (_files(tmp_path / d)["release/mp_rank_00/model_optim_rng.pt"]["model"]
                            for d in ("merged", "from_release"))
    assert merged.keys() == from_release.keys()
    assert all(torch.equal(merged[k], from_release[k]) for k in merged if not k.endswith("_extra_state"))
    for source in ("merged", "split"):
        _convert("mm_to_hf", tmp_path / source, tmp_path / f"back_{source}")
        back = load_file(str(tmp_path / f"back_{source}" / "diffusion_pytorch_model.safetensors"))
        assert set(back) == set(original)
        assert all(torch.equal(back[k], v) for k, v in original.items())
        config = json.loads((tmp_path / f"back_{source}" / "config.json").read_text())
        release = json.loads((tmp_path / "93x480p" / "config.json").read_text())
        assert {k: v for k, v in release.items() if k in config} == config


def test_mindspeed_names_convert_to_the_same_checkpoint(tmp_path):
    from mm.models.predictor.opensoraplan.weights import mindspeed_name

    _release(tmp_path / "reference", "t2v")
    _release(tmp_path / "mindspeed", "t2v", names=mindspeed_name)
    for name in ("reference", "mindspeed"):
        _convert("hf_to_mm", tmp_path / name, tmp_path / f"mm_{name}", tp=2)
    a, b = _files(tmp_path / "mm_reference"), _files(tmp_path / "mm_mindspeed")
    assert sorted(a) == sorted(b)
    for path in a:
        assert set(a[path]["model"]) == set(b[path]["model"])
        assert all(torch.equal(v, b[path]["model"][k]) for k, v in a[path]["model"].items())


# ------------------------------------------------------------------------------ loading into the model


def _arch(variant: str):
    from mm.families import predictor_config

    meta = _golden()
    tiny = meta["tiny_config"]
    params = dict(head_dim=tiny["attention_head_dim"], in_channels=tiny["in_channels"],
                  out_channels=tiny["out_channels"], cross_attention_dim=tiny["cross_attention_dim"],
                  caption_channels=tiny["caption_channels"], sparse1d=tiny["sparse1d"], sparse_n=tiny["sparse_n"])
    if variant == "i2v":
        params["vae_scale_factor_t"] = meta["vae_scale_factor_t"]
    return predictor_config("videoditsparsei2v" if variant == "i2v" else "videoditsparse", params,
                            tiny["num_layers"], tiny["num_attention_heads"])


def _load_worker(rank, world, directory, variant, tp, pp_layers):
    """This rank's chunks of the model under the checkpoint's layout, loaded by load_checkpoint;
    returns whether every tensor equals the reference's (mapped by the name table), and with one
    stage the golden cases' largest output error."""
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer import TransformerConfig

    from mm.families import build_predictor
    from mm.models.predictor.opensoraplan.weights import load_reference_weights
    from mm.models.predictor.pipeline import layer_layout, stage_span
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from mm.training.checkpointing import load_checkpoint

    vpp = len(pp_layers) if pp_layers and isinstance(pp_layers[0], list) else None
    pp = world // tp
    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=tp, pipeline_parallel=pp),
                        virtual_pipeline_parallel=vpp, seed=0)
    osp = _arch(variant)
    model_id = "videoditsparsei2v" if variant == "i2v" else "videoditsparse"
    config = TransformerConfig(num_layers=osp.num_layers, hidden_size=osp.hidden_size,
                               num_attention_heads=osp.num_heads, tensor_model_parallel_size=tp,
                               params_dtype=torch.float32, use_cpu_initialization=True)
    layout = layer_layout(osp.num_layers, pp, vpp, pp_layers or None)
    stage, tp_rank = mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank()
    chunks, twins = [], []
    for chunk in range(len(layout)):
        offset, count = stage_span(layout, stage, chunk)
        where = dict(pre_process=stage == 0 and chunk == 0, post_process=stage == pp - 1 and chunk == len(layout) - 1,
                     layer_offset=offset, num_layers=count)
        chunks.append(build_predictor(model_id, osp, config, **where).eval())  # random weights
        twins.append(build_predictor(model_id, osp, config, **where).eval())
        load_reference_weights(twins[-1], _reference_state(variant), tp_size=tp, tp_rank=tp_rank)
    resumed = load_checkpoint(directory, chunks, None, None, load_optim=False, load_rng=False)
    same = True
    for part, twin in zip(chunks, twins):
        mine = {k: v for k, v in part.state_dict().items() if isinstance(v, torch.Tensor)}
        theirs = {k: v for k, v in twin.state_dict().items() if isinstance(v, torch.Tensor)}
        same = same and mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())
    errors = {}
    if pp == 1:
        io = load_file(str(FIXTURES / "dit_io.safetensors"))
        for case in [c for c in _golden()["cases"] if (c == "i2v") == (variant == "i2v")]:
            x = {k.split(".", 1)[1]: v for k, v in io.items() if k.startswith(case + ".")}
            with torch.no_grad():
                out = chunks[0](latents=x["hidden_states"], timestep=x["timestep"],
                                context=x["encoder_hidden_states"][:, 0],
                                context_mask=x["encoder_attention_mask"][:, 0], video_mask=x["attention_mask"])
            errors[case] = (out - x["output"]).abs().max().item()
    destroy_parallel()
    return resumed, same, errors


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_tp2_checkpoint_reproduces_the_reference_outputs(tmp_path, variant):
    _release(tmp_path / "hf", variant)
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "mm", tp=2)
    results = run_distributed(2, _load_worker, str(tmp_path / "mm"), variant, 2, [])
    cases = ["i2v"] if variant == "i2v" else ["t2v", "t2v_video_mask"]
    for resumed, same, errors in results:
        assert resumed == (0, 0) and same  # converted weights: training starts at iteration 0
        assert sorted(errors) == cases and all(e <= 1e-4 for e in errors.values()), errors


def test_pipeline_checkpoints_load_under_their_layout_and_merge_for_inference(tmp_path):
    _release(tmp_path / "hf", "i2v")
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "vpp", tp=1, pp_layers=[[1, 1], [1, 1]])
    for resumed, same, _ in run_distributed(2, _load_worker, str(tmp_path / "vpp"), "i2v", 1, [[1, 1], [1, 1]]):
        assert resumed == (0, 0) and same
    _convert("resplit", tmp_path / "vpp", tmp_path / "pp", tp=1, pp_layers=[3, 1])
    for resumed, same, _ in run_distributed(2, _load_worker, str(tmp_path / "pp"), "i2v", 1, [3, 1]):
        assert same
    # MindSpeed-MM's inference step: merge to TP1 without PP, then one process reproduces the reference
    _convert("resplit", tmp_path / "pp", tmp_path / "merged")
    (resumed, same, errors), = run_distributed(1, _load_worker, str(tmp_path / "merged"), "i2v", 1, [])
    assert same and errors["i2v"] <= 1e-4, errors


# ------------------------------------------------------------------------------ the VAE


class TrainingArguments:
    """A class pickled into a training checkpoint: loading it would run code from the pickle."""


def _vae_release(root: Path, layout: str) -> dict[str, torch.Tensor]:
    """The released vae/ directory: config.json and merged.ckpt (a torch pickle holding the reference's
    state dict, Haar filters included, in one of the reference's checkpoint layouts)."""
    state = load_file(str(FIXTURES / "wfvae_tiny_state_dict.safetensors"))
    config = json.loads((FIXTURES / "wfvae_tiny_config.json").read_text())["config"]
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(dict(config, _class_name="WFVAEModel")))
    if layout == "ema":  # EMA weights (DDP names) next to the model's (zeros but the fixed Haar filters)
        from mm.models.ae.wfvae_checkpoint import wfvae_state_dict_from_reference

        trained = wfvae_state_dict_from_reference(state)
        model = {k: torch.zeros_like(v) if k in trained else v for k, v in state.items()}
        checkpoint = {"ema_state_dict": {f"module.{k}": v for k, v in state.items()},
                      "state_dict": {"gen_model": model}, "epoch": 3}
    else:
        checkpoint = {"state_dict": state}
    torch.save(checkpoint, root / "merged.ckpt")
    return state


@pytest.mark.parametrize("layout", ["state_dict", "ema"])
def test_vae_convert_writes_what_ae_from_pretrained_reads(tmp_path, layout):
    from mm.models.ae.wfvae_checkpoint import load_wfvae, wfvae_state_dict_from_reference

    state = _vae_release(tmp_path / "vae", layout)
    _convert("vae_convert", tmp_path / "vae" / "merged.ckpt", tmp_path / "mm" / "vae.pt")
    written = torch.load(tmp_path / "mm" / "vae.pt", weights_only=True)
    expected = wfvae_state_dict_from_reference(state)  # the Haar filters left out
    assert set(written) == set(expected) and len(written) < len(state)
    assert all(torch.equal(written[k], v) for k, v in expected.items())
    if layout == "ema":  # --use_ema false: the model's weights (zeros here)
        from checkpoint.config import ConvertConfig
        from mm.families.opensoraplan.convert import OpenSoraPlanConverter

        OpenSoraPlanConverter("v1.3").vae_convert(
            ConvertConfig(str(tmp_path / "vae" / "merged.ckpt"), str(tmp_path / "model.pt")), use_ema=False)
        model = torch.load(tmp_path / "model.pt", weights_only=True)
        assert set(model) == set(expected) and all(not v.any() for v in model.values())
    # the model JSON's ae section: from_pretrained is vae.pt, the config keys beside it
    config = json.loads((FIXTURES / "wfvae_tiny_config.json").read_text())["config"]
    vae = load_wfvae(str(tmp_path / "mm" / "vae.pt"), params=config)
    golden = load_file(str(FIXTURES / "wfvae_tiny_golden.safetensors"))
    with torch.no_grad():
        mean, _ = vae.encode(golden["image"])
    torch.testing.assert_close(mean, golden["image_mean"], atol=1e-4, rtol=0)


def test_vae_convert_errors(tmp_path):
    from checkpoint.config import ConvertError

    _vae_release(tmp_path / "vae", "state_dict")
    target = tmp_path / "out" / "vae.pt"
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(config, latent_dim=8, scale=[1.0] * 8,
                                                                  shift=[0.0] * 8)))
    with pytest.raises(ConvertError, match="do not match the WFVAE .*config.json describes:\n  misshapen"):
        _convert("vae_convert", tmp_path / "vae" / "merged.ckpt", target)
    with pytest.raises(ConvertError, match="not a file"):
        _convert("vae_convert", tmp_path / "vae", target)
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "hparams": TrainingArguments()},
               tmp_path / "pickled.ckpt")
    with pytest.raises(ConvertError, match="does not run pickled code"):
        _convert("vae_convert", tmp_path / "pickled.ckpt", target)
    torch.save({"model": {"dit.weight": torch.zeros(1)}}, tmp_path / "nested.ckpt")
    with pytest.raises(ConvertError, match=r"no WFVAE state dict there \(top-level keys \['model'\]"):
        _convert("vae_convert", tmp_path / "nested.ckpt", target)
    torch.save({"proj_out.weight": torch.zeros(1)}, tmp_path / "dit.ckpt")
    with pytest.raises(ConvertError, match=r"not a WFVAE state dict \(tensors outside encoder.\* / decoder.\*: "
                                           "proj_out"):
        _convert("vae_convert", tmp_path / "dit.ckpt", target)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------ errors and the command line


def test_bad_input_fails_before_anything_is_written(tmp_path):
    from checkpoint.config import ConvertError
    from mm.families.opensoraplan.convert import OpenSoraPlanConverter

    _release(tmp_path / "hf", "t2v")
    target = tmp_path / "out"
    with pytest.raises(ConvertError, match="--version 'v1.2'; valid: v1.3"):
        OpenSoraPlanConverter("v1.2")
    with pytest.raises(ConvertError, match=r"tp_size = 3 does not divide the model's 2 attention heads; "
                                           r"valid: \[1, 2\]"):
        _convert("hf_to_mm", tmp_path / "hf", target, tp=3)
    with pytest.raises(ConvertError, match=r"pp_layers = \[2, 3\] sums to 5 layers; the model has 4"):
        _convert("hf_to_mm", tmp_path / "hf", target, pp_layers=[2, 3])
    with pytest.raises(ConvertError, match="virtual pipeline chunks need at least 2 stages"):
        _convert("hf_to_mm", tmp_path / "hf", target, pp_layers=[[2], [2]])
    # missing, unexpected and absent tensors, all named
    state = load_file(str(tmp_path / "hf" / "diffusion_pytorch_model.safetensors"))
    config = (tmp_path / "hf" / "config.json").read_text()
    del state["transformer_blocks.1.attn1.to_k.weight"], state["proj_out.bias"]
    state["transformer_blocks.0.lora_A.weight"] = torch.zeros(2)
    (tmp_path / "broken").mkdir()
    save_file(state, str(tmp_path / "broken" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "broken" / "config.json").write_text(config)
    with pytest.raises(ConvertError) as info:
        _convert("hf_to_mm", tmp_path / "broken", target)
    for name in ("transformer_blocks.1.attn1.to_k.weight", "proj_out.bias", "transformer_blocks.0.lora_A.weight"):
        assert name in str(info.value)
    # a config.json that does not describe the weights
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "diffusion_pytorch_model.safetensors").symlink_to(
        tmp_path / "hf" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(dict(json.loads(config), in_channels=8)))
    with pytest.raises(ConvertError, match=r"pos_embed.proj.weight is \[24, 4, 2, 2\], expected \[24, 8, 2, 2\]"):
        _convert("hf_to_mm", tmp_path / "wrong", target)
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(dict(json.loads(config), sparse_n=0)))
    with pytest.raises(ConvertError, match="predictor.sparse_n = 0"):
        _convert("hf_to_mm", tmp_path / "wrong", target)
    assert not target.exists()
    # a directory that is neither an mm checkpoint nor a release
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text(config)
    with pytest.raises(ConvertError, match="no latest_checkpointed_iteration.txt"):
        _convert("resplit", tmp_path / "neither", target)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_wan_checkpoint_is_refused(tmp_path):
    from checkpoint.config import ConvertConfig, ConvertError, ParallelConfig
    from mm.families.wan.convert import WanConverter
    from tests.wan_helpers import diffusers_model, tiny_kwargs

    diffusers_model(tiny_kwargs(), seed=0).save_pretrained(str(tmp_path / "wan"), safe_serialization=True)
    WanConverter("wan2.1").hf_to_mm(ConvertConfig(str(tmp_path / "wan"), str(tmp_path / "wan_mm"), ParallelConfig()))
    with pytest.raises(ConvertError, match="is not a Open-Sora-Plan v1.3 DiT checkpoint: .* tensors have no row"):
        _convert("resplit", tmp_path / "wan_mm", tmp_path / "out")
    with pytest.raises(ConvertError, match="cannot tell the checkpoint format"):
        _convert("hf_to_mm", tmp_path / "wan", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.extended  # the same commands through the console script: tests/functional/test_opensoraplan_guide.py
def test_command_line(tmp_path):
    """The real entry point with the commands of MindSpeed-MM's OpenSoraPlan 1.3 guide."""
    _release(tmp_path / "raw_ckpt" / "open-sora-plan" / "93x480p", "t2v")
    _vae_release(tmp_path / "raw_ckpt" / "open-sora-plan" / "vae", "state_dict")
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def mm_convert(*args):
        return subprocess.run([sys.executable, "-m", "checkpoint", "OpenSoraPlanConverter", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    done = mm_convert("--version", "v1.3", "vae_convert",
                      "--cfg.source_path", "raw_ckpt/open-sora-plan/vae/merged.ckpt",
                      "--cfg.target_path", "mm_ckpt/open-sora-plan/vae.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mm_ckpt" / "open-sora-plan" / "vae.pt").is_file()
    assert "checked against config.json" in done.stdout
    done = mm_convert("--version", "v1.3", "hf_to_mm", "--cfg.source_path", "./raw_ckpt/open-sora-plan/93x480p/",
                      "--cfg.target_path", "mm_ckpt/open-sora-plan/pretrained-checkpoint-dit",
                      "--cfg.target_parallel_config.tp_size", "2",
                      "--cfg.target_parallel_config.pp_layers", "[[1,1],[1,1]]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "as TP2 PP2 VPP2 layers [[1, 1], [1, 1]]" in done.stdout
    split = tmp_path / "mm_ckpt" / "open-sora-plan" / "pretrained-checkpoint-dit"
    assert (split / "release" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()
    done = mm_convert("--version", "v1.3", "resplit", "--cfg.source_path", str(split), "--cfg.target_path", "merged")
    assert done.returncode == 0 and "as TP1 PP1 layers [[4]]" in done.stdout, done.stderr[-3000:]
    failed = mm_convert("--version", "v1.2", "hf_to_mm", "--cfg.source_path", "raw_ckpt/open-sora-plan/93x480p",
                        "--cfg.target_path", "x")
    assert failed.returncode == 2 and "mm-convert: error: --version 'v1.2'; valid: v1.3" in failed.stderr
    verbs = mm_convert("--help")
    assert all(v in verbs.stdout for v in ("vae_convert", "hf_to_mm", "mm_to_hf", "resplit"))
