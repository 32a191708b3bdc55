"""Step-Video-T2V through its entry points on the tiny release of tests/stepvideo_assets.py (a 2-layer
DiT of 2 heads x 128, the Step VAE, Step-LLM + HunyuanCLIP), torchrun on CPU with gloo, fp32: every
parallel layout equals one process with the same seed.

- pretrain_t2v.py: the losses of TP2 + SP, CP2 Ulysses, CP2 ring with send/recv overlap, PP2, DP2 with
  the distributed optimizer and encoder-DP (TP2) equal one process's. The data has two buckets (32x32
  and 48x32 frames: 12 and 18 latent tokens), so ring CP splits a token count that is no multiple of
  its 2 x CP chunks and the pipeline's stage message changes length between micro-batches.
- inference.py: the latents (save_latents) and the decoded video of TP2, CP2 Ulysses, --cfg-parallel
  (one guidance branch per rank) and VAE-CP 2 (the 34 frames are two VAE chunks, one a rank) equal
  one process's.
- mm-convert StepVideoConverter: hf_to_mm then mm_to_hf gives the release tensors back bit for bit;
  pretrain_t2v.py --load <converted> --finetune at TP2 trains as the release weights do on one
  process; inference.py --load <that training checkpoint> samples what the checkpoint's mm_to_hf
  export samples.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.markers import marked_extended
from tests.stepvideo_assets import HEIGHT, WIDTH, make_assets

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ITERS = 4
FRAMES = 34  # two VAE chunks of 17 frames: what VAE-CP over 2 ranks needs; 6 latent frames
PROMPT = "a red square moving left to right"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from mm.data import make_dataset

    paths = make_assets(tmp_path_factory.mktemp("stepvideo"))
    # training data in two buckets of different token counts (the fixture's own videos are all 32x32)
    data_txt = make_dataset(paths.root / "data_buckets", num_videos=8, frames=24,
                            sizes=[(HEIGHT, WIDTH), (HEIGHT + 16, WIDTH)], fps=16)
    data = json.loads(paths.data.read_text())
    data["dataset_param"]["basic_parameters"]["data_path"] = str(data_txt)
    pre = data["dataset_param"]["preprocess_parameters"]
    pre["buckets"] = [[pre.pop("num_frames"), pre.pop("max_height"), pre.pop("max_width")],
                      [17, HEIGHT + 16, WIDTH]]
    paths.data.write_text(json.dumps(data, indent=1))
    return paths


def _model_json(assets, name: str, base: str = "model", predictor: dict | None = None, ae: dict | None = None,
                inference: dict | None = None, **top) -> Path:
    """A copy of the fixture's model JSON (``base``: model or inference) with some keys changed;
    a value of None removes the key."""
    model = json.loads(getattr(assets, base).read_text())
    for section, changes in (("predictor", predictor), ("ae", ae), ("inference", inference), (None, top)):
        target = model if section is None else model.get(section)
        for key, value in (changes or {}).items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    path = assets.root / f"{name}_model.json"
    path.write_text(json.dumps(model, indent=1))
    return path


def _failure(done: subprocess.CompletedProcess) -> str:
    """A failed run's output without progress bars and warnings (the failing rank's traceback stays)."""
    noise = ("it/s]", "s/it]", "Warning", "warnings.warn", "No CUDA runtime is found")
    err = "\n".join(line for line in done.stderr.splitlines() if not any(n in line for n in noise))
    return f"exit status {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{err[-6000:]}"


def _torchrun(nproc: int, script: list[str], *flags: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script,
           *flags]
    done = subprocess.run(cmd, cwd=REPO, env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, _failure(done)
    return done.stdout


def _train(assets, nproc: int, model_json: Path, *flags: str, mbs: int = 1, gbs: int = 2,
           script: list[str] | None = None) -> tuple[list[float], str]:
    out = _torchrun(nproc, script or ["pretrain_t2v.py"], "--mm-model", str(model_json), "--mm-data",
                    str(assets.data), "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--lr", "1e-4",
                    "--train-iters", str(ITERS), "--log-interval", "1", "--num-workers", "0", "--seed", "7", *flags)
    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", out)], out


def _layout(flags, nproc: int) -> str:
    """The layout line the entry points print for these flags."""
    def size(flag):
        return int(flags[flags.index(flag) + 1]) if flag in flags else 1

    tp, cp, pp = size("--tensor-model-parallel-size"), size("--context-parallel-size"), \
        size("--pipeline-model-parallel-size")
    algo = flags[flags.index("--context-parallel-algo") + 1] if "--context-parallel-algo" in flags else \
        "ulysses_cp_algo"
    return f"TP={tp} PP={pp} VPP=1 CP={cp} ({algo}) DP={nproc // (tp * cp * pp)}"


def _assert_same_losses(ref: list[float], got: list[float], what) -> None:
    assert len(ref) == len(got) == ITERS, (what, ref, got)
    for a, b in zip(ref, got):
        assert abs(a - b) <= 2e-5 * abs(a), (what, ref, got)


REFERENCE: dict = {}


def _reference(assets, mbs: int) -> list[float]:
    """One process's losses from the release weights (predictor.from_pretrained), micro-batch ``mbs``."""
    if mbs not in REFERENCE:
        losses, out = _train(assets, 1, assets.model, "--log-throughput", mbs=mbs)
        assert "throughput per CPU process (GFLOP/s)" in out  # the recipe's model FLOPs
        assert len(set(losses)) == ITERS, losses  # other batches, levels and weights each iteration
        REFERENCE[mbs] = losses
    return REFERENCE[mbs]


TRAINING = {  # name -> (processes, flags, predictor changes)
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], None),
    "cp2_ulysses": (2, ["--context-parallel-size", "2", "--context-parallel-algo", "ulysses_cp_algo"], None),
    "cp2_ring_overlap": (2, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
                             "--use-cp-send-recv-overlap"], None),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"], {"pipeline_num_layers": [1, 1]}),
    # each replica micro-batch 1: what one process reads with micro-batch 2
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"], None),
    # 4 ranks (extended): Ulysses 2 inside a ring of 2; TP and PP together
    "cp4_hybrid": (4, ["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo",
                       "--ulysses-degree-in-cp", "2", "--use-cp-send-recv-overlap"], None),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size",
                    "2"], {"pipeline_num_layers": [1, 1]}),
}


# tp2_sp, cp2_ulysses (extended): the Step-Video DiT under each against one process in-process
# (tests/parallel/test_stepvideo_dit.py); the training loop under each with Wan (test_pretrain_t2v.py:
# TP2 + SP in its recompute and TP2+SP+CP2 tests, the cp2_ulysses layout); Step-Video's entry point under
# TP2 against one process: tests/functional/test_text_encoder_fsdp.py, under CP2: cp2_ring_overlap here.
# dp2_distributed_optimizer (extended): Step-Video's entry point under DP2 against one process is
# test_text_encoder_fsdp.py's dp2; the distributed optimizer in the loop test_pretrain_t2v.py's
# pp2_dp2_distributed_optimizer layout and TP2+SP+CP2 test
TRAINING_EXTENDED = {"cp4_hybrid", "tp2_pp2", "tp2_sp", "cp2_ulysses", "dp2_distributed_optimizer"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", marked_extended(sorted(TRAINING), TRAINING_EXTENDED))
def test_training_losses_equal_one_process(assets, layout):
    nproc, flags, predictor = TRAINING[layout]
    line = _layout(flags, nproc)
    dp = int(line.rsplit("DP=", 1)[1])
    ref = _reference(assets, mbs=dp)
    model_json = _model_json(assets, layout, predictor=predictor) if predictor else assets.model
    got, out = _train(assets, nproc, model_json, *flags)
    assert f"mm: {nproc} rank(s) on cpu (gloo); {line}" in out, out[-3000:]
    _assert_same_losses(ref, got, layout)


# pretrain_t2v.py with every call of encoder-DP's sharing recorded on each rank: how many samples
# this rank's encoders (the VAE, Step-LLM, HunyuanCLIP) were given
ENCODER_SPY = """
import json
import os
import sys

from mm.training import pretrain as training

seen = []
share = training.encode_data_parallel


def spied(fn, *inputs, group):
    def counted(*tensors):
        seen.append(int(tensors[0].shape[0]))
        return fn(*tensors)

    return share(counted, *inputs, group=group)


training.encode_data_parallel = spied
training.pretrain(sys.argv[2:], task="t2v")
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
"""

ENCODER_DP = {  # name -> (flags, model JSON top-level changes)
    "tp2_offload2": (["--tensor-model-parallel-size", "2"], {"encoder_offload_interval": 2}),
    "cp2_ring": (["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"], {}),
}


@pytest.mark.slow
# cp2_ring: encoder-DP's group is TP x CP whichever splits it (tests/parallel/test_encoder_dp.py)
@pytest.mark.parametrize("case", marked_extended(sorted(ENCODER_DP), {"cp2_ring"}))
def test_encoder_dp_shares_the_encoding_and_keeps_the_losses(assets, tmp_path, case):
    """enable_encoder_dp: the 2 ranks of the TP x CP group each encode one of the micro-batch's 2
    samples (one process encodes both) with every frozen encoder; the losses are one process's."""
    flags, top = ENCODER_DP[case]
    model_json = _model_json(assets, f"encdp_{case}", enable_encoder_dp=True, **top)
    (tmp_path / "spied_pretrain.py").write_text(ENCODER_SPY)
    got, out = _train(assets, 2, model_json, *flags, mbs=2, script=[str(tmp_path / "spied_pretrain.py"),
                                                                       str(tmp_path)])
    assert _layout(flags, 2) in out, out[-3000:]
    _assert_same_losses(_reference(assets, mbs=2), got, case)
    for rank in range(2):
        shares = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert shares == [1] * 3 * ITERS, (rank, shares)  # 3 encoders a micro-batch, 1 of its 2 samples


# --- inference.py


def _sample(assets, name: str, nproc: int, *flags: str, ae: dict | None = None, predictor: dict | None = None,
            script: list[str] | None = None) -> dict:
    """inference.py on one prompt of FRAMES frames: {"latents", "frames" (the .mp4 decoded), "log"}."""
    out = assets.root / "samples" / name
    model_json = _model_json(assets, f"sample_{name}", base="inference", ae=ae, predictor=predictor,
                             inference={"prompt": PROMPT, "num_frames": FRAMES, "save_path": str(out),
                                        "save_latents": True})
    log = _torchrun(nproc, script or ["inference.py"], "--mm-model", str(model_json), *flags)
    (video,) = out.glob("*.mp4")  # rank 0 alone writes
    return {"latents": torch.load(video.with_suffix(".latents.pt")), "frames": _frames(video), "log": log}


def _frames(path: Path) -> torch.Tensor:
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])).float()


def _assert_same_sample(got: dict, ref: dict, what) -> None:
    torch.testing.assert_close(got["latents"], ref["latents"], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")
    assert got["frames"].shape == ref["frames"].shape == (FRAMES, HEIGHT, WIDTH, 3)
    # the same frames up to the H.264 encoding of float-rounding differences
    assert (got["frames"] - ref["frames"]).abs().mean() < 0.5, what


@pytest.fixture(scope="module")
def one_process_sample(assets):
    ref = _sample(assets, "one_process", 1)
    assert ref["latents"].shape == (1, 8, 6, HEIGHT // 16, WIDTH // 16)  # 2 chunks x 3 latent frames
    assert ref["latents"].abs().max() > 1 and ref["frames"].std() > 10  # neither blank nor flat
    return ref


INFERENCE = {  # name -> (processes, flags, ae changes)
    "tp2": (2, ["--tensor-model-parallel-size", "2"], None),
    "cp2_ulysses": (2, ["--context-parallel-size", "2", "--context-parallel-algo", "ulysses_cp_algo"], None),
    # VAE-CP over the CP2 group (ring with send/recv overlap for the DiT): each rank decodes one chunk
    "cp2_ring_vae_cp2": (2, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
                             "--use-cp-send-recv-overlap"], {"vae_cp_size": 2}),
}


# cp2_ulysses (extended): the Step-Video DiT under Ulysses against one process in-process
# (tests/parallel/test_stepvideo_dit.py), the sampling loop under CP2 Ulysses with Wan
# (test_inference.py::test_sharded_dit_and_text_encoder_change_nothing); Step-Video's sampling under CP2:
# cp2_ring_vae_cp2 here
@pytest.mark.slow
@pytest.mark.parametrize("layout", marked_extended(sorted(INFERENCE), {"cp2_ulysses"}))
def test_inference_equals_one_process(assets, one_process_sample, layout):
    nproc, flags, ae = INFERENCE[layout]
    got = _sample(assets, layout, nproc, *flags, ae=ae)
    assert _layout(flags, nproc) in got["log"]
    assert ("decoded over 2 VAE-CP ranks" in got["log"]) == bool(ae)
    _assert_same_sample(got, one_process_sample, layout)


# inference.py with the Step-LLM context of each DiT forward recorded on every rank
CONTEXT_SPY = """
import os
import sys

import torch

from mm.families.spec import FamilySpec
from mm.inference import runner

seen = []
build_predictor = FamilySpec.build_predictor


def spied_build_predictor(*args, **kwargs):
    model = build_predictor(*args, **kwargs)
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["llm_context"].clone()),
                                    with_kwargs=True)
    return model


FamilySpec.build_predictor = spied_build_predictor
runner.inference(sys.argv[2:])
torch.save(seen, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_cfg_parallel_runs_one_branch_per_rank(assets, tmp_path, one_process_sample):
    """--cfg-parallel on 2 ranks: each rank runs the DiT on one branch a step (rank 0 the prompt,
    rank 1 the negative prompt); one process runs both in a batch of two. The sample is one process's."""
    (tmp_path / "spied_inference.py").write_text(CONTEXT_SPY)
    got = _sample(assets, "cfg_parallel", 2, "--cfg-parallel",
                  script=[str(tmp_path / "spied_inference.py"), str(tmp_path)])
    steps = json.loads(assets.inference.read_text())["diffusion"]["num_inference_timesteps"]
    contexts = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, seen in enumerate(contexts):
        assert len(seen) == steps and all(c.shape[0] == 1 and torch.equal(c, seen[0]) for c in seen), rank
    assert not torch.allclose(contexts[0][0], contexts[1][0])  # two different branches
    _assert_same_sample(got, one_process_sample, "cfg_parallel")


# --- mm-convert


def _mm_convert(capsys, *args: str) -> str:
    """mm-convert StepVideoConverter (the console script's main) in this process."""
    from checkpoint.cli import main

    capsys.readouterr()
    main(["StepVideoConverter", *args])
    return capsys.readouterr().out


def _release(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return json.loads((directory / "config.json").read_text()), tensors


SPLITS = {"tp2": ("2", "[]", "TP2 PP1", 2), "pp2": ("1", "[1,1]", "TP1 PP2", 2),
          "tp2_pp2": ("2", "[1,1]", "TP2 PP2", 4)}  # -> tp_size, pp_layers, the split's name, rank files


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_conversion_round_trip_is_exact(assets, tmp_path, capsys, split):
    tp, pp_layers, name, files = SPLITS[split]
    out = _mm_convert(capsys, "hf_to_mm", "--cfg.source_path", str(assets.transformer), "--cfg.target_path",
                      str(tmp_path / "mm"), "--cfg.target_parallel_config.tp_size", tp,
                      "--cfg.target_parallel_config.pp_layers", pp_layers)
    assert f"as {name}" in out, out
    assert len(list((tmp_path / "mm" / "release").glob("mp_rank_*/model_optim_rng.pt"))) == files
    _mm_convert(capsys, "mm_to_hf", "--cfg.source_path", str(tmp_path / "mm"), "--cfg.target_path",
                str(tmp_path / "hf"))
    config, tensors = _release(assets.transformer)
    back_config, back = _release(tmp_path / "hf")
    assert back_config == config
    assert sorted(back) == sorted(tensors) and len(tensors) > 40
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


@pytest.mark.slow
# mm_to_hf of the torch_dist checkpoint in this process (no process group)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_converted_weights_train_and_the_checkpoint_samples(assets, tmp_path, capsys, one_process_sample):
    """hf_to_mm for TP2; pretrain_t2v.py --load it --finetune at TP2 (the model JSON without
    from_pretrained) gives one process's losses from the release. inference.py --load the training
    checkpoint (under CP2: the TP2 checkpoint resharded; --load replaces predictor.from_pretrained's
    release weights) samples what the checkpoint's mm_to_hf export samples on one process, and not what
    the release samples."""
    _mm_convert(capsys, "hf_to_mm", "--cfg.source_path", str(assets.transformer), "--cfg.target_path",
                str(tmp_path / "mm"), "--cfg.target_parallel_config.tp_size", "2")
    model_json = _model_json(assets, "converted", predictor={"from_pretrained": None})
    ckpt = tmp_path / "ckpt"
    got, out = _train(assets, 2, model_json, "--tensor-model-parallel-size", "2", "--load", str(tmp_path / "mm"),
                      "--finetune", "--save", str(ckpt))
    assert f"loaded model weights from {tmp_path / 'mm' / 'release'} (--finetune" in out, out[-3000:]
    _assert_same_losses(_reference(assets, mbs=1), got, "converted")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)

    loaded = _sample(assets, "trained_cp2", 2, "--context-parallel-size", "2", "--load", str(ckpt))
    assert f"loaded model weights from {ckpt / f'iter_{ITERS:07d}'}" in loaded["log"], loaded["log"][-3000:]
    _mm_convert(capsys, "mm_to_hf", "--cfg.source_path", str(ckpt), "--cfg.target_path", str(tmp_path / "hf"))
    exported = _sample(assets, "trained_export", 1, predictor={"from_pretrained": str(tmp_path / "hf")})
    _assert_same_sample(loaded, exported, "trained")
    assert not torch.allclose(loaded["latents"], one_process_sample["latents"], atol=1e-2)  # the trained weights


@pytest.mark.slow
@pytest.mark.extended  # converted weights under TP2: test_converted_weights_train_and_the_checkpoint_samples
def test_weights_converted_for_pp2_train_as_one_process(assets, tmp_path, capsys):
    """hf_to_mm with pp_layers [1, 1]; pretrain_t2v.py --load it --no-load-optim --no-load-rng at PP2."""
    _mm_convert(capsys, "hf_to_mm", "--cfg.source_path", str(assets.transformer), "--cfg.target_path",
                str(tmp_path / "mm"), "--cfg.target_parallel_config.pp_layers", "[1,1]")
    model_json = _model_json(assets, "converted_pp2",
                             predictor={"from_pretrained": None, "pipeline_num_layers": [1, 1]})
    got, out = _train(assets, 2, model_json, "--pipeline-model-parallel-size", "2", "--load", str(tmp_path / "mm"),
                      "--no-load-optim", "--no-load-rng")
    assert f"loaded model weights from {tmp_path / 'mm' / 'release'} (release" in out, out[-3000:]
    _assert_same_losses(_reference(assets, mbs=1), got, "converted_pp2")


@pytest.mark.slow
@pytest.mark.extended
def test_interleaved_pipeline_equals_one_process(tmp_path_factory):
    """PP2 x VPP2 on a 4-layer release (one layer per virtual stage): the losses of one process."""
    deep = make_assets(tmp_path_factory.mktemp("stepvideo_4l"), num_layers=4)
    ref, _ = _train(deep, 1, deep.model)
    model = json.loads(deep.model.read_text())
    model["predictor"]["pipeline_num_layers"] = [[1, 1], [1, 1]]
    path = deep.root / "vpp_model.json"
    path.write_text(json.dumps(model))
    got, out = _train(deep, 2, path, "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size",
                      "2")
    assert "TP=1 PP=2 VPP=2 CP=1" in out, out[-3000:]
    _assert_same_losses(ref, got, "pp2_vpp2")
