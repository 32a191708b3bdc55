"""The Step-Video DiT on one GPU: bf16 (cuDNN attention) against the same weights in float64 on the
CPU, a layer compiled without graph breaks and equal to eager, and the tiny release sampled and
trained through the entry points on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu

_SMALL = """
import os
os.environ['CUDA_DEVICE_MAX_CONNECTIONS'] = '1'
import torch, torch._dynamo
from megatron.core.transformer import TransformerConfig
from mm.accelerator import init_distributed, select_accelerator
from mm.families import build_predictor
from mm.families.stepvideo.config import StepVideoDiTConfig
from mm.parallel import ParallelSizes, initialize_parallel
acc = select_accelerator('cuda'); init_distributed(acc, 5)
initialize_parallel(ParallelSizes(world_size=1), seed=0, attention_kernel='cudnn')
arch = StepVideoDiTConfig.from_json(dict(num_layers=2, num_heads=2, head_dim=128, in_channels=8, out_channels=8,
                                         caption_channels=[32, 16]))
def build(dtype, device):
    config = TransformerConfig(num_layers=2, hidden_size=arch.hidden_size, num_attention_heads=2, params_dtype=dtype,
                               bf16=dtype == torch.bfloat16, use_cpu_initialization=device == 'cpu')
    return build_predictor('stepvideodit', arch, config).to(device).eval()
torch.manual_seed(0)
ref = build(torch.float64, 'cpu')
with torch.no_grad():
    for name, p in ref.named_parameters():
        p.copy_(torch.randn_like(p) * 0.05 + (1.0 if 'norm' in name and name.endswith('weight') else 0.0))
gpu = build(torch.bfloat16, 'cuda')
missing, _ = gpu.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items() if torch.is_tensor(v)},
                                 strict=False)
assert not [k for k in missing if not k.endswith('_extra_state')], missing
b, f, h, w = 2, 3, 6, 8
g = torch.Generator().manual_seed(1)
x = torch.randn(b, 8, f, h, w, generator=g, dtype=torch.float64)
llm = torch.randn(b, 10, 32, generator=g, dtype=torch.float64)
mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
clip = torch.randn(b, 7, 16, generator=g, dtype=torch.float64)
t = torch.tensor([0.25, 0.75], dtype=torch.float64)
# the DiT embeds t * 1000 in t's dtype, as the reference (0.75 -> 752 in bf16): give float64 the same product
t_ref = (t.bfloat16() * 1000).double() / 1000
with torch.no_grad():
    want = ref(latents=x, timestep=t_ref, llm_context=llm, llm_mask=mask, clip_context=clip)
    got = gpu(latents=x.cuda().bfloat16(), timestep=t.cuda().bfloat16(), llm_context=llm.cuda().bfloat16(),
              llm_mask=mask.cuda(), clip_context=clip.cuda().bfloat16()).double().cpu()
rel = ((got - want).norm() / want.norm()).item()
print('bf16 relative error', rel)
assert rel < 3e-2, rel
state = {}
def keep(module, args, kwargs):
    state['args'], state['kwargs'] = args, kwargs
handle = gpu.blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
with torch.no_grad():
    gpu(latents=x.cuda().bfloat16(), timestep=t.cuda().bfloat16(), llm_context=llm.cuda().bfloat16(),
        llm_mask=mask.cuda(), clip_context=clip.cuda().bfloat16())
handle.remove()
layer = gpu.blocks[0]
with torch.no_grad():
    explanation = torch._dynamo.explain(layer)(*state['args'], **state['kwargs'])
for r in explanation.break_reasons:
    print('graph break:', str(r.reason).splitlines()[0])
print('graph breaks', explanation.graph_break_count)
assert explanation.graph_break_count == 0
with torch.no_grad():
    eager = layer(*state['args'], **state['kwargs']).double()
    fused = torch.compile(layer)(*state['args'], **state['kwargs']).double()
compile_rel = ((fused - eager).norm() / eager.norm()).item()
print('compiled vs eager relative error', compile_rel)
assert compile_rel < 2e-2, compile_rel
print('ok')
"""


def test_bf16_parity_and_compile_without_graph_breaks():
    result = subprocess.run([sys.executable, "-c", _SMALL], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    print(result.stdout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def test_tiny_release_samples_and_trains_on_one_gpu(tmp_path):
    for module in ("transformers", "sentencepiece", "av"):
        pytest.importorskip(module)
    from tests.stepvideo_assets import make_assets

    assets = make_assets(tmp_path)
    env = dict(os.environ, MM_ACCELERATOR="cuda", PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
               PYTHONPATH=str(REPO))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    result = subprocess.run(run + ["inference.py", "--mm-model", str(assets.inference), "--bf16"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 2, result.stdout[-3000:]
    result = subprocess.run(run + ["pretrain_t2v.py", "--mm-model", str(assets.model), "--mm-data", str(assets.data),
                                   "--lr", "1e-4", "--train-iters", "3", "--log-interval", "1", "--micro-batch-size",
                                   "1", "--global-batch-size", "2", "--num-workers", "0", "--bf16"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "iteration      3/3" in result.stdout, result.stdout[-3000:]
