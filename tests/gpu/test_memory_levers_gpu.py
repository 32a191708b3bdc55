"""The activation-memory levers on one GPU (bf16): ``--recompute-modules layernorm`` (alone, with
``mlp``, eager and in compiled layers) gives the loss and gradients of the layer without recompute,
its compiled region traces without a graph break (a break would run the region eagerly), and it
holds less for the backward than the compiled layer without it. The CPU fp64 twins are in
tests/parallel/test_wan_dit.py and test_opensoraplan_dit.py."""

from __future__ import annotations

import pytest

from tests.gpu import GPU_KERNELS, run_script

pytestmark = pytest.mark.gpu

_LEVERS = """
import os
os.environ['CUDA_DEVICE_MAX_CONNECTIONS'] = '1'
import sys, torch, torch._dynamo
from mm.accelerator import init_distributed, select_accelerator
from mm.parallel import ParallelSizes, initialize_parallel
from mm.models.predictor.wan import WanDiT, WanDiTConfig
from tests.wan_helpers import inputs, megatron_config, tiny_kwargs
acc = select_accelerator('cuda'); init_distributed(acc, 5)
initialize_parallel(ParallelSizes(world_size=1), seed=0, attention_kernel=sys.argv[1])
kw = dict(tiny_kwargs(layers=3), hidden_size=256, num_heads=2, ffn_dim=1024)
x = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != 'timestep' else v.cuda()
     for k, v in inputs(kw, 9, 16, 24).items()}
torch.manual_seed(0)
state = WanDiT(WanDiTConfig(**kw), megatron_config(kw, dtype=torch.bfloat16)).state_dict()
probe = None

def run(modules, compiled):
    global probe
    extra = dict(recompute_granularity='selective', recompute_modules=modules) if modules else {}
    model = WanDiT(WanDiTConfig(**kw), megatron_config(kw, dtype=torch.bfloat16, **extra)).cuda().train()
    model.load_state_dict(state)
    torch._dynamo.reset(); torch._dynamo.utils.counters.clear()
    if compiled:
        model.compile_blocks()
        model(**x).float().square().mean().backward()  # compile outside the measured step
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); before = torch.cuda.memory_allocated()
    out = model(**x)
    torch.cuda.synchronize(); held = torch.cuda.memory_allocated() - before
    if probe is None:
        probe = torch.randn_like(out)
    (out.float() * probe).sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    breaks = sum(torch._dynamo.utils.counters['graph_break'].values())
    return out.float(), grads, held, breaks

ref_out, ref_grads, _, _ = run(None, False)
_, _, held_none, _ = run(None, True)
for modules, compiled in ((['layernorm'], False), (['layernorm'], True), (['layernorm', 'mlp'], True)):
    out, grads, held, breaks = run(modules, compiled)
    rel_out = ((out - ref_out).norm() / ref_out.norm()).item()
    rel_grad = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    print(modules, 'compiled' if compiled else 'eager', 'out', rel_out, 'grads', rel_grad, 'held MiB', held / 2**20,
          'compiled none held MiB', held_none / 2**20, 'graph breaks', breaks)
    assert rel_out < 2e-2 and rel_grad < 3e-2, (rel_out, rel_grad)
    if compiled:
        assert breaks == 0, breaks
        assert held < held_none, (held, held_none)
print('ok')
"""


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_layernorm_recompute_matches_and_holds_less(kernel):
    run_script(_LEVERS, kernel)
