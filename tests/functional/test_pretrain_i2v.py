"""pretrain_i2v.py through torchrun on synthetic videos (CPU, gloo): Wan2.1 I2V (CLIP branch, channel
concat), FLF2V, Wan2.2 I2V-A14B experts (channel concat, timestep range) and TI2V-5B (first-frame
latent, per-token timesteps), each compared with one process under a parallel layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.encoder_helpers import save_clip
from tests.markers import marked_extended

REPO = Path(__file__).resolve().parents[2]
Z = 4  # the quickstart VAE's latent channels
CLIP_TOKENS, CLIP_DIM = 5, 16  # tests/encoder_helpers.save_clip: (28 / 14)^2 + 1 tokens of width 16

VARIANTS = {
    "wan21_i2v": ("i2v", {"in_dim": 2 * Z + 4, "image_dim": CLIP_DIM}),
    "wan21_flf2v": ("flf2v", {"in_dim": 2 * Z + 4, "image_dim": CLIP_DIM, "pos_embed_seq_len": 2 * CLIP_TOKENS}),
    "wan22_i2v_a14b": ("i2v", {"in_dim": 2 * Z + 4}),
    "wan22_ti2v": ("i2v", {"in_dim": Z}),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, quickstart_assets):
    root = quickstart_assets(tmp_path_factory.mktemp("i2v"))
    save_clip(root / "clip")
    base = json.loads((root / "model.json").read_text())
    data = json.loads((root / "data.json").read_text())
    pairs = []
    for name, (dataset_type, predictor) in VARIANTS.items():
        model = json.loads(json.dumps(base))
        model["predictor"].update(predictor, num_layers=2)
        if "image_dim" in predictor:
            model["image_encoder"] = {"model_id": "clip", "from_pretrained": str(root / "clip"), "dtype": "fp32"}
        (root / f"{name}_model.json").write_text(json.dumps(model))
        pairs += [str(root / f"{name}_model.json"), str(root / f"{name}_dit")]
        data["dataset_param"]["dataset_type"] = dataset_type
        (root / f"{name}_data.json").write_text(json.dumps(data))
    # every variant's fixed DiT weights from one process
    subprocess.run([sys.executable, "tests/functional/dit_weights.py", *pairs], cwd=REPO, check=True,
                   capture_output=True)
    return root


def _run(assets, variant, nproc, *flags, entry="pretrain_i2v.py", iters=3, model=None):
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", entry,
           "--mm-model", str(model or assets / f"{variant}_model.json"), "--mm-data",
           str(assets / f"{variant}_data.json"), "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3",
           "--train-iters", str(iters), "--log-interval", "1", "--num-workers", "0", "--seed", "11", *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", result.stdout)]


def _with_pipeline(assets, variant, layout):
    model = json.loads((assets / f"{variant}_model.json").read_text())
    model["predictor"]["pipeline_num_layers"] = layout
    path = assets / f"{variant}_pp_model.json"
    path.write_text(json.dumps(model))
    return path


LAYOUTS = {
    # the CLIP tokens ride in the stage message to the second stage
    "wan21_i2v": (2, ["--pipeline-model-parallel-size", "2"], [1, 1]),
    "wan21_flf2v": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], None),
    # the low-noise expert (t < 0.9 T), with encoder-DP across TP
    "wan22_i2v_a14b": (2, ["--tensor-model-parallel-size", "2", "--max-timestep-boundary", "0.9"], None),
    # per-token timesteps sharded over CP
    "wan22_ti2v": (2, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"], None),
}


# Wan2.2 A14B I2V: Wan2.1 I2V's conditioning without CLIP; the expert's timestep range is tested in
# tests/unit (flow matching), encoder-DP across TP by test_pretrain_t2v.py
EXTENDED = {"wan22_i2v_a14b"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", marked_extended(sorted(LAYOUTS), EXTENDED))
def test_i2v_variant_parallel_equals_one_process(assets, variant):
    nproc, flags, layout = LAYOUTS[variant]
    extra = [f for f in flags if f.startswith("--max-timestep") or f == "0.9"]
    ref = _losses(_run(assets, variant, 1, *extra))
    model = _with_pipeline(assets, variant, layout) if layout else None
    par = _losses(_run(assets, variant, nproc, *flags, model=model))
    assert len(ref) == len(par) == 3
    for a, b in zip(ref, par):
        assert abs(a - b) <= 2e-5 * abs(a), (variant, ref, par)


def test_task_mismatch_is_refused_before_start(assets):
    result = _run(assets, "wan21_i2v", 1, entry="pretrain_t2v.py", iters=1)
    assert result.returncode != 0
    assert "pretrain_t2v.py: error: predictor.in_dim = 12 with dataset_type 'i2v' is i2v conditioning: train it " \
           "with pretrain_i2v.py" in result.stderr
    assert "iteration" not in result.stdout
    text_only = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "pretrain_i2v.py",
         "--mm-model", str(assets / "model.json"), "--mm-data", str(assets / "data.json"), "--lr", "1e-3",
         "--train-iters", "1"], cwd=REPO, env=dict(os.environ, MM_ACCELERATOR="cpu"), capture_output=True, text=True,
        timeout=300)
    assert text_only.returncode != 0
    assert "dataset_param.dataset_type = 't2v' with predictor.in_dim = 4 is text-only conditioning" in text_only.stderr


def test_clip_model_without_image_encoder_is_refused(assets):
    model = json.loads((assets / "wan21_i2v_model.json").read_text())
    del model["image_encoder"]
    path = assets / "noclip_model.json"
    path.write_text(json.dumps(model))
    result = _run(assets, "wan21_i2v", 1, iters=1, model=path)
    assert result.returncode != 0 and "needs image_encoder.from_pretrained" in result.stderr


def _inference_model(assets, variant, task, out: Path) -> Path:
    """The variant's model JSON with an inference section: a first (and for FLF2V a last) frame image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for name in ("first", "last"):
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(assets / f"{name}.png")
    model = json.loads((assets / f"{variant}_model.json").read_text())
    model["inference"] = {"prompt": "a red square moving left to right", "task": task, "num_frames": 9,
                          "height": 64, "width": 64, "sample_steps": 3, "guidance_scale": 3.0,
                          "conditional_pixel_values_path": str(assets / "first.png"),
                          "model_max_length": 16, "save_path": str(out), "save_latents": True}
    if task == "flf2v":
        model["inference"]["last_image"] = str(assets / "last.png")
    path = out.parent / f"{out.name}_model.json"
    path.write_text(json.dumps(model))
    return path


@pytest.mark.parametrize("variant,task", [("wan21_i2v", "i2v"), ("wan21_flf2v", "flf2v"),
                                          pytest.param("wan22_i2v_a14b", "i2v", marks=pytest.mark.extended),
                                          ("wan22_ti2v", "i2v")])
def test_image_to_video_sampling(assets, tmp_path, variant, task):
    """inference.py samples image-conditioned models (images resized to the video size); CP2 gives the
    same latents as one process. TI2V: the first latent frame is the image's latent."""
    import torch

    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    latents = []
    for nproc, flags in ((1, []), (2, ["--context-parallel-size", "2", "--context-parallel-algo",
                                       "megatron_cp_algo"])):
        out = tmp_path / f"samples{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "inference.py", "--mm-model", str(_inference_model(assets, variant, task, out)), *flags]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (path,) = out.glob("*.latents.pt")
        latents.append(torch.load(path))
        assert len(list(out.glob("*.mp4"))) == 1
    assert latents[0].shape == (1, Z, 3, 8, 8)
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-4, atol=1e-4)
    if variant == "wan22_ti2v":
        from mm.data.images import load_condition_frames
        from mm.models.ae import load_wan_vae
        from mm.models.predictor.wan.conditioning import ti2v_image_latents

        model = json.loads((assets / f"{variant}_model.json").read_text())
        image = ti2v_image_latents(load_wan_vae(model["ae"]["from_pretrained"]),
                                   load_condition_frames([str(assets / "first.png")], 64, 64))
        torch.testing.assert_close(latents[0][:, :, :1], image, rtol=1e-5, atol=1e-5)


def test_image_to_video_needs_its_images(assets, tmp_path):
    model = json.loads((assets / "wan21_flf2v_model.json").read_text())
    model["inference"] = {"prompt": "x", "task": "flf2v", "num_frames": 9, "height": 64, "width": 64,
                          "image": str(tmp_path / "missing.png")}
    path = tmp_path / "bad_model.json"
    path.write_text(json.dumps(model))
    env = dict(os.environ, MM_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "inference.py", "--mm-model", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "inference.image: no such file" in done.stderr and "needs inference.last_image" in done.stderr


def test_ti2v_image_to_video_needs_a_frame_to_sample(assets, tmp_path):
    path = _inference_model(assets, "wan22_ti2v", "i2v", tmp_path / "out")
    model = json.loads(path.read_text())
    model["inference"]["num_frames"] = 1
    path.write_text(json.dumps(model))
    done = subprocess.run([sys.executable, "inference.py", "--mm-model", str(path)], cwd=REPO,
                          env=dict(os.environ, MM_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "inference.num_frames = 1 with task 'i2v' on a TI2V model" in done.stderr, done.stderr
