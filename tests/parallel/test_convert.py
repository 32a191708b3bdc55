"""mm-convert WanConverter: HuggingFace -> mm shards -> resplit -> HuggingFace is bit-exact; the
original Wan release converts to the same shards as diffusers' layout; converted shards load into
the TP-split model and give diffusers' output; bad input fails before anything is written."""

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
from tests.wan_helpers import diffusers_inputs, diffusers_model, inputs, tiny_kwargs

REPO = Path(__file__).resolve().parents[2]


def _diffusers_dir(root: Path, kwargs: dict, seed: int = 0, max_shard_size: str | None = None) -> dict:
    model = diffusers_model(kwargs, seed=seed)
    model.save_pretrained(str(root), safe_serialization=True,
                          **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _original_dir(root: Path, kwargs: dict, diffusers_state: dict) -> None:
    """The same weights under the original Wan release's names and config."""
    from mm.models.predictor.wan import mm_to_hf
    from mm.models.predictor.wan.weights import hf_to_mm

    from checkpoint.sources import HFSource
    from mm.models.predictor.wan.weights import WAN_WEIGHTS

    keys = HFSource(root.parent / "diffusers", WAN_WEIGHTS).keys()
    state = mm_to_hf([hf_to_mm(diffusers_state, keys)], fmt="original")
    root.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "diffusion_pytorch_model.safetensors"))
    config = {"dim": kwargs["hidden_size"], "ffn_dim": kwargs["ffn_dim"], "num_heads": kwargs["num_heads"],
              "num_layers": kwargs["num_layers"], "in_dim": kwargs["in_dim"], "out_dim": kwargs["out_dim"],
              "freq_dim": kwargs["freq_dim"], "text_len": 512, "eps": 1e-6,
              "model_type": "i2v" if kwargs.get("image_dim") else "t2v"}
    (root / "config.json").write_text(json.dumps(config))


def _convert(verb: str, source, target, tp: int = 1, pp_layers=None, **extra) -> None:
    from checkpoint.config import ConvertConfig, ParallelConfig
    from mm.families.wan.convert import WanConverter

    cfg = ConvertConfig(source_path=str(source), target_path=str(target),
                        target_parallel_config=ParallelConfig(tp_size=tp, pp_layers=pp_layers or []), **extra)
    getattr(WanConverter("wan2.1"), verb)(cfg)


def _diffusers_load(directory: Path):
    """What diffusers itself makes of a directory: WanTransformer3DModel.from_pretrained (config.json,
    one safetensors file or several with their index); every tensor must be there."""
    from diffusers import WanTransformer3DModel

    model, info = WanTransformer3DModel.from_pretrained(str(directory), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    assert all(k.endswith("norm_added_q.weight") for k in info["missing_keys"]), info
    return model


def _files(root: Path) -> dict[str, dict]:
    """Every rank file of an mm torch-format checkpoint: relative path -> its dict."""
    return {str(p.relative_to(root)): torch.load(p, weights_only=False) for p in sorted(root.rglob("*.pt"))}


# name -> (tp_size, pp_layers); a row of pp_layers per virtual chunk
TARGETS = {"tp2_pp2": (2, [1, 1]), "tp2_pp2_vpp2": (2, [[1, 1], [1, 1]]), "tp2_pp2_uneven": (2, [2, 1])}
LAYERS = {"tp2_pp2": 2, "tp2_pp2_vpp2": 4, "tp2_pp2_uneven": 3}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_round_trip_is_bit_exact(tmp_path, variant, target):
    kwargs = tiny_kwargs(image=variant == "i2v", layers=LAYERS[target])
    original = _diffusers_dir(tmp_path / "hf", kwargs, max_shard_size="20KB")  # several files and an index
    assert (tmp_path / "hf" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    tp, pp_layers = TARGETS[target]
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "split", tp=tp, pp_layers=pp_layers)
    files = _files(tmp_path / "split")
    pp = len(pp_layers) if not isinstance(pp_layers[0], list) else len(pp_layers[0])
    assert sorted(files) == sorted(f"release/mp_rank_{t:02d}_{s:03d}/model_optim_rng.pt"
                                   for t in range(tp) for s in range(pp))
    # TP shards are real halves: rank 0 and rank 1 hold different q/k/v rows of the same shape
    stage0 = [files[f"release/mp_rank_{t:02d}_000/model_optim_rng.pt"] for t in range(tp)]
    chunk = "model" if target != "tp2_pp2_vpp2" else "model0"
    qkv = [s[chunk]["blocks.0.self_attention.linear_qkv.weight"] for s in stage0]
    assert qkv[0].shape == (3 * kwargs["hidden_size"] // 2, kwargs["hidden_size"]) and not torch.equal(*qkv)
    _convert("resplit", tmp_path / "split", tmp_path / "merged", tp=1)
    assert sorted(_files(tmp_path / "merged")) == ["release/mp_rank_00/model_optim_rng.pt"]
    _convert("mm_to_hf", tmp_path / "merged", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    expected = {k: v for k, v in original.items() if not k.endswith("norm_added_q.weight")}
    assert set(back) == set(expected)
    for key, value in expected.items():
        assert torch.equal(back[key], value), key
    # diffusers loads the directory as it is
    state = _diffusers_load(tmp_path / "back").state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    # straight from the split checkpoint too, in several files
    _convert("mm_to_hf", tmp_path / "split", tmp_path / "back_sharded", max_shard_size_gb=20e3 / 2**30)
    index = json.loads((tmp_path / "back_sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(expected)
    sharded = _diffusers_load(tmp_path / "back_sharded").state_dict()
    assert all(torch.equal(sharded[k], v) for k, v in expected.items())


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_original_release_converts_to_the_same_checkpoint(tmp_path, variant):
    kwargs = tiny_kwargs(image=variant == "i2v")
    state = _diffusers_dir(tmp_path / "diffusers", kwargs)
    _original_dir(tmp_path / "original", kwargs, state)
    for name in ("diffusers", "original"):
        _convert("hf_to_mm", tmp_path / name, tmp_path / f"mm_{name}", tp=2, pp_layers=[1, 1])
    a, b = _files(tmp_path / "mm_diffusers"), _files(tmp_path / "mm_original")
    assert sorted(a) == sorted(b)
    for path in a:
        assert set(a[path]["model"]) == set(b[path]["model"]) and len(a[path]["model"]) > 10
        for key, value in a[path]["model"].items():
            assert torch.equal(value, b[path]["model"][key]), (path, key)
    header_a = json.loads((tmp_path / "mm_diffusers" / "release" / "checkpoint.json").read_text())
    header_b = json.loads((tmp_path / "mm_original" / "release" / "checkpoint.json").read_text())
    # the same model description, but for RoPE's table length, which no weight carries (the original
    # release always uses 1024; the tiny diffusers model 64)
    arch_a, arch_b = header_a["extra"]["predictor"], header_b["extra"]["predictor"]
    assert arch_b.pop("rope_max_seq_len") == 1024 and arch_a.pop("rope_max_seq_len") == 64
    assert arch_a == arch_b


def _load_and_run_worker(rank, world, directory, variant):
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from mm.training.checkpointing import load_checkpoint
    from tests.wan_helpers import megatron_config

    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=world), seed=0)
    kwargs = tiny_kwargs(image=variant == "i2v")
    model = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs, tp=world))  # random weights
    resumed = load_checkpoint(directory, [model], None, None, load_optim=False, load_rng=False)
    with torch.no_grad():
        out = model(**inputs(kwargs, 3, 4, 6))
    destroy_parallel()
    return resumed, out


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_converted_checkpoint_loads_into_the_tp_model_and_matches_diffusers(tmp_path, variant):
    kwargs = tiny_kwargs(image=variant == "i2v")
    _diffusers_dir(tmp_path / "hf", kwargs, seed=3)
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "mm", tp=2)
    results = run_distributed(2, _load_and_run_worker, str(tmp_path / "mm"), variant)
    reference = diffusers_model(kwargs, seed=3)
    with torch.no_grad():
        expected = reference(**diffusers_inputs(kwargs, inputs(kwargs, 3, 4, 6)), return_dict=False)[0]
    for resumed, out in results:
        assert resumed == (0, 0)  # converted weights: training starts at iteration 0
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_bad_input_fails_before_anything_is_written(tmp_path):
    from checkpoint.config import ConvertError

    kwargs = tiny_kwargs()
    _diffusers_dir(tmp_path / "hf", kwargs)
    target = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"tp_size = 3 does not divide the model's 2 attention heads; valid: \[1, 2\]"):
        _convert("hf_to_mm", tmp_path / "hf", target, tp=3)
    with pytest.raises(ConvertError, match=r"pp_layers = \[1, 2\] sums to 3 layers; the model has 2"):
        _convert("hf_to_mm", tmp_path / "hf", target, pp_layers=[1, 2])
    with pytest.raises(ConvertError, match="pp_layers = \\[\\[1\\], \\[1, 0\\]\\]"):
        _convert("hf_to_mm", tmp_path / "hf", target, pp_layers=[[1], [1, 0]])
    with pytest.raises(ConvertError, match="virtual pipeline chunks need at least 2 stages"):
        _convert("hf_to_mm", tmp_path / "hf", target, pp_layers=[[1], [1]])
    assert not target.exists()
    # missing and unexpected tensors, all named
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(str(tmp_path / "hf" / "diffusion_pytorch_model.safetensors"))
    del state["blocks.1.attn1.to_k.weight"]
    state["blocks.0.extra_adapter.weight"] = torch.zeros(2)
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    (broken / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    with pytest.raises(ConvertError) as info:
        _convert("hf_to_mm", broken, target)
    assert "blocks.1.attn1.to_k.weight" in str(info.value) and "blocks.0.extra_adapter.weight" in str(info.value)
    assert not target.exists()
    # an existing target is kept unless overwrite
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(ConvertError, match="exists; pass --cfg.overwrite true"):
        _convert("hf_to_mm", tmp_path / "hf", target)
    assert (target / "keep").read_text() == "x"
    _convert("hf_to_mm", tmp_path / "hf", target, overwrite=True)
    assert not (target / "keep").exists() and (target / "latest_checkpointed_iteration.txt").read_text() == "release\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failure_while_writing_leaves_no_target(tmp_path, monkeypatch):
    from checkpoint import writers

    _diffusers_dir(tmp_path / "hf", tiny_kwargs())
    calls, real_save = [], torch.save

    def failing_save(obj, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(obj, f)

    monkeypatch.setattr(writers.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        _convert("hf_to_mm", tmp_path / "hf", tmp_path / "out", tp=2)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left either


def test_command_line(tmp_path, monkeypatch, capsys):
    """The real entry point, with the option names of MindSpeed-MM's OpenSoraPlan 1.3 guide: a
    conversion through python -m checkpoint; its refusal (exit status 2) and the listings through
    checkpoint.cli.main, what python -m checkpoint runs, in this process (one process start each
    otherwise)."""
    from checkpoint.cli import main

    _diffusers_dir(tmp_path / "hf", tiny_kwargs(layers=4))
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def mm_convert(*args):
        return subprocess.run([sys.executable, "-m", "checkpoint", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    def in_process(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    done = mm_convert("WanConverter", "--version", "wan2.1", "hf_to_mm", "--cfg.source_path", "hf",
                      "--cfg.target_path", "mm", "--cfg.target_parallel_config.tp_size", "2",
                      "--cfg.target_parallel_config.pp_layers", "[[1,1],[1,1]]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hf_to_mm: diffusers weights in" in done.stdout and "as TP2 PP2 VPP2" in done.stdout
    assert (tmp_path / "mm" / "release" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process("WanConverter", "--version", "wan2.1", "hf_to_mm", "--cfg.source_path", "hf",
                              "--cfg.target_path", "mm2", "--cfg.target_parallel_config.tp_size", "3")
    assert code == 2 and "mm-convert: error: --cfg.target_parallel_config.tp_size = 3" in err
    code, listing, _ = in_process("--help")
    assert code == 0 and "WanConverter" in listing
    code, verbs, _ = in_process("WanConverter", "--help")
    assert code == 0 and all(v in verbs for v in ("hf_to_mm", "mm_to_hf", "resplit")) and "--version" in verbs


def test_source_parallel_config_is_checked(tmp_path):
    from checkpoint.config import ConvertConfig, ConvertError, ParallelConfig
    from mm.families.wan.convert import WanConverter

    _diffusers_dir(tmp_path / "hf", tiny_kwargs())
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "mm", tp=2, pp_layers=[1, 1])
    wrong = ConvertConfig(str(tmp_path / "mm"), str(tmp_path / "out"), source_parallel_config=ParallelConfig(1))
    with pytest.raises(ConvertError, match="is tp_size 2, pp_layers \\[1, 1\\]"):
        WanConverter("wan2.1").resplit(wrong)
    right = ConvertConfig(str(tmp_path / "mm"), str(tmp_path / "out"),
                          source_parallel_config=ParallelConfig(2, [1, 1]))
    WanConverter("wan2.1").resplit(right)
    assert (tmp_path / "out" / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    with pytest.raises(ConvertError, match="no latest_checkpointed_iteration.txt"):
        _convert("mm_to_hf", tmp_path / "hf", tmp_path / "out2")
    with pytest.raises(ConvertError, match="--version 'wan3'; valid: wan2.1, wan2.2"):
        WanConverter("wan3")


def test_damaged_safetensors_fail_naming_file_and_tensor_and_write_nothing(tmp_path):
    """A truncated download, a corrupt header, and a file cut short while it is read: each a
    SourceDataError naming the file and the tensor, no target (hf_to_mm used to write zeros)."""
    from checkpoint.config import SourceDataError
    from checkpoint.sources import HFSource
    from mm.models.predictor.wan.weights import WAN_WEIGHTS

    _diffusers_dir(tmp_path / "hf", tiny_kwargs())
    good = (tmp_path / "hf" / "diffusion_pytorch_model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    weights = broken / "diffusion_pytorch_model.safetensors"
    target = tmp_path / "out"

    def fails(data: bytes, pattern: str) -> None:
        weights.write_bytes(data)
        with pytest.raises(SourceDataError, match=pattern):
            _convert("hf_to_mm", broken, target, tp=2)
        assert not target.exists() and not (tmp_path / ".out.tmp").exists()

    fails(good[:len(good) * 2 // 3], rf"{weights}: tensor '[^']+' lies at bytes \[\d+, \d+\), past the file's end "
                                     rf"at {len(good) * 2 // 3} bytes \(truncated\)")
    fails(good[:header_end - 10], f"{weights}: its header says it is {header_end - 8} bytes long, but the file has "
                                  f"only {header_end - 10} bytes")
    fails(good[:5], f"{weights}: 5 bytes, too short for a safetensors file")
    fails(good[:8] + b"{" * (header_end - 8) + good[header_end:], f"{weights}: its header is not valid JSON")
    shrunk = good[:header_end].replace(b'"shape":[24]', b'"shape":[12]', 1) + good[header_end:]
    fails(shrunk, r"tensor '[^']+': data_offsets \[\d+, \d+\) do not hold its F32 \[12\] \(48 bytes\)")
    # cut short after it was opened: the read itself comes up short
    weights.write_bytes(good)
    source = HFSource(broken, WAN_WEIGHTS)
    weights.write_bytes(good[:header_end + 100])
    with pytest.raises(SourceDataError, match=rf"{weights}: tensor '[^']+': read \d+ of its \d+ bytes at byte \d+; "
                                              "the file ended early"):
        for key in source.keys():
            source.parts(key)


def test_damaged_mm_checkpoint_fails_naming_the_file(tmp_path):
    from mm.ckpt import DamagedCheckpointError

    _diffusers_dir(tmp_path / "hf", tiny_kwargs())
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "mm", tp=2)
    rank_file = tmp_path / "mm" / "release" / "mp_rank_01" / "model_optim_rng.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:2000])
    with pytest.raises(DamagedCheckpointError, match=f"{rank_file} has 2000 bytes, the manifest records"):
        _convert("mm_to_hf", tmp_path / "mm", tmp_path / "out")
    (tmp_path / "mm" / "release" / "manifest.json").unlink()  # as written before manifests: the read fails
    with pytest.raises(DamagedCheckpointError, match=f"cannot read {rank_file}: RuntimeError"):
        _convert("mm_to_hf", tmp_path / "mm", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_mm_to_hf_files_get_the_umask_mode(tmp_path, umask):
    _diffusers_dir(tmp_path / "hf", tiny_kwargs())
    _convert("hf_to_mm", tmp_path / "hf", tmp_path / "mm")
    old = os.umask(umask)
    try:
        _convert("mm_to_hf", tmp_path / "mm", tmp_path / "out", max_shard_size_gb=20e-6)  # several shards
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {oct(0o666 & ~umask)}, modes
