"""The CUDA path of the accelerator layer and runtime, on one GPU (run on the accelerator machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu


def test_pretrain_t2v_on_one_gpu(tmp_path):
    subprocess.run([sys.executable, "examples/quickstart/make_assets.py", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    env = dict(os.environ, MM_ACCELERATOR="cuda", PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "pretrain_t2v.py",
           "--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"), "--lr", "1e-3",
           "--train-iters", "5", "--log-interval", "1", "--micro-batch-size", "2", "--num-workers", "1",
           "--use-distributed-optimizer"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 rank(s) on cuda (nccl)" in result.stdout and "iteration      5/5" in result.stdout


def test_tensor_parallel_layers_on_gpu_match_cpu():
    # megatron-core's layers on the real device, world of one, against a CPU reference
    code = """
import torch
from mm.accelerator import init_distributed, select_accelerator
from mm.parallel import ParallelSizes, initialize_parallel
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear
acc = select_accelerator('cuda')
init_distributed(acc, 5)
initialize_parallel(ParallelSizes(world_size=1), seed=3)
layer = ColumnParallelLinear(16, 32, config=ModelParallelConfig(params_dtype=torch.float32),
                             init_method=torch.nn.init.normal_, bias=False, gather_output=True)
assert layer.weight.device.type == 'cuda'
x = torch.randn(4, 2, 16, device='cuda')
out, _ = layer(x)
ref = x.double().cpu() @ layer.weight.double().cpu().t()
err = (out.double().cpu() - ref).norm() / ref.norm()
assert err < 1e-2, err
print('ok', float(err))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_samplers_on_gpu_match_cpu(solver):
    """The schedule lives on the CPU; the sample on the GPU: every step's arithmetic must follow the
    sample's device and give the CPU's result."""
    import torch

    from mm.diffusion.samplers import build_sampler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 3, 8, 8, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        sampler, x = build_sampler(solver, 6, 3.0), noise.to(device)
        for t in sampler.timesteps:
            x = sampler.step(0.9 * (noise.to(device) - x0.to(device)) + 0.01 * x * t.float() / 1000, x)
        results.append(x.cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


# inference.py with the DiT's parameter bytes, the device memory allocated when each DiT forward
# starts, and the run's peak recorded (in bytes: the log's GiB to two places cannot show a tiny
# model's drop)
MEMORY_SPY = """
import os
import sys

import torch

from mm.families.spec import FamilySpec
from mm.inference import runner

seen = {"dit_bytes": 0, "at_forward": []}
build_predictor = FamilySpec.build_predictor


def spied_build_predictor(*args, **kwargs):
    model = build_predictor(*args, **kwargs)
    seen["dit_bytes"] += sum(p.numel() * p.element_size() for p in model.parameters())
    model.register_forward_pre_hook(lambda module, args: seen["at_forward"].append(torch.cuda.memory_allocated()))
    return model


FamilySpec.build_predictor = spied_build_predictor
runner.inference(sys.argv[2:])
seen["peak"] = torch.cuda.max_memory_allocated()
torch.save(seen, os.path.join(sys.argv[1], "seen.pt"))
"""


def test_inference_on_one_gpu(tmp_path):
    """inference.py on CUDA: the quickstart's model (from a short training run) sampled to an .mp4;
    offloading changes nothing but the memory held (less by the models it keeps on the host),
    compiled DiT layers only bf16 rounding."""
    subprocess.run([sys.executable, "examples/quickstart/make_assets.py", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    env = dict(os.environ, MM_ACCELERATOR="cuda", PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "pretrain_t2v.py",
             "--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"), "--lr", "1e-3",
             "--train-iters", "2", "--micro-batch-size", "1", "--num-workers", "0", "--save", str(tmp_path / "ckpt")]
    result = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    import torch
    from safetensors.torch import load_file

    spy = tmp_path / "memory_spy.py"
    spy.write_text(MEMORY_SPY)
    seen, latents = {}, {}
    for name, extra in (("resident", {}), ("offload", {"offload_model": True, "t5_cpu": True}), ("compiled", {})):
        model = json.loads((tmp_path / "inference_model.json").read_text())
        model["inference"].update(extra, save_latents=True, save_path=str(tmp_path / name), prompt="a red square")
        (tmp_path / f"{name}.json").write_text(json.dumps(model))
        (tmp_path / name).mkdir()
        sample = [sys.executable, str(spy), str(tmp_path / name), "--bf16", "--mm-model",
                  str(tmp_path / f"{name}.json"), "--load", str(tmp_path / "ckpt")] + \
            (["--compile-dit-blocks"] if name == "compiled" else [])
        result = subprocess.run(sample, cwd=REPO, env=dict(env, PYTHONPATH=os.pathsep.join(
                                    filter(None, [str(REPO), env.get("PYTHONPATH")]))), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert len(list((tmp_path / name).glob("*.mp4"))) == 1 and "peak memory" in result.stdout
        seen[name] = torch.load(tmp_path / name / "seen.pt")
        latents[name] = torch.load(next((tmp_path / name).glob("*.latents.pt")))
    # the same video, with the models brought to the device one stage at a time
    assert torch.equal(latents["offload"], latents["resident"])
    # the models' bytes on the device: the text encoder's fp32 (its JSON dtype), the VAE's bf16 (--bf16; at
    # least 2 bytes a weight), the DiT's as built
    assert json.loads((tmp_path / "inference_model.json").read_text())["text_encoder"]["dtype"] == "fp32"
    t5 = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "umt5" / "model.safetensors")).values())
    vae = 2 * sum(t.numel() for t in load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")).values())
    dit = seen["offload"]["dit_bytes"]
    assert dit == seen["resident"]["dit_bytes"] > 0 and t5 > 0 and vae > 0
    # while the DiT denoises, offload_model keeps the VAE on the host and t5_cpu the text encoder: every
    # step starts with at least their bytes fewer allocated than when all models stay on the device
    resident, offload = seen["resident"]["at_forward"], seen["offload"]["at_forward"]
    assert len(resident) == len(offload) > 0
    assert min(r - o for r, o in zip(resident, offload)) >= t5 + vae, (resident, offload, t5, vae)
    # the peak: the resident run's holds every model; each stage of the offloaded run holds less by a model
    # on the host: the DiT while its weights load, the text encoder from its construction on (also while
    # the DiT comes to the device for denoising before the VAE leaves)
    assert seen["offload"]["peak"] <= seen["resident"]["peak"] - min(dit, t5), (seen, dit, t5)
    # the compiled DiT layers (fused elementwise work in bf16) sample the same video up to bf16 rounding
    torch.testing.assert_close(latents["compiled"], latents["resident"], rtol=5e-2, atol=5e-2)


def test_ti2v_and_phantom_sampling_on_gpu_match_cpu(tmp_path):
    """inference.py on CUDA and on the CPU (fp32): TI2V-style first-frame sampling (the quickstart's
    in_dim = out_dim model with task i2v) and Phantom s2v with two references give the same latents."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    subprocess.run([sys.executable, "examples/quickstart/make_assets.py", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    # fixed DiT weights, set as predictor.from_pretrained (the quickstart's model JSON has none)
    subprocess.run([sys.executable, "tests/functional/dit_weights.py", str(tmp_path / "inference_model.json"),
                    str(tmp_path / "dit")], cwd=REPO, check=True, capture_output=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in (("first", (64, 64)), ("ref0", (40, 64)), ("ref1", (64, 30))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    tasks = {"ti2v": {"task": "i2v", "image": str(tmp_path / "first.png")},
             "s2v": {"ref_images": [str(tmp_path / "ref0.png"), str(tmp_path / "ref1.png")]}}
    for task, extra in tasks.items():
        latents = {}
        for device in ("cuda", "cpu"):
            model = json.loads((tmp_path / "inference_model.json").read_text())
            out = tmp_path / f"{task}_{device}"
            model["inference"].update(extra, save_latents=True, save_path=str(out), prompt="a red square",
                                      sample_steps=4)
            (tmp_path / f"{task}_{device}.json").write_text(json.dumps(model))
            env = dict(os.environ, MM_ACCELERATOR=device, PYTHONUNBUFFERED="1")
            result = subprocess.run([sys.executable, "inference.py", "--mm-model", str(tmp_path / f"{task}_{device}.json")],
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            latents[device] = torch.load(next(out.glob("*.latents.pt")))
        torch.testing.assert_close(latents["cuda"], latents["cpu"], rtol=1e-3, atol=1e-3)
