"""The GPU attention kernels against the math kernel in bf16: output, log-sum-exp, and the
backward from a merged (two-block) log-sum-exp, as ring attention uses it."""

from __future__ import annotations

import pytest
import torch

from mm.accelerator.attention_kernels import KERNELS, default_scale, kernels_for

pytestmark = pytest.mark.gpu
FLASH3 = pytest.param("flash3", marks=pytest.mark.skipif("flash3" not in kernels_for("cuda"),
                                                         reason="flash-attention 3 is not installed"))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", ["flash", "cudnn", FLASH3])
def test_gpu_kernel_matches_math(name):
    torch.manual_seed(0)
    kernel, math = KERNELS[name](), KERNELS["math"]()
    d = 128  # the Wan / Open-Sora-Plan head size (a flash-attention 3 build may hold no other)
    q = torch.randn(2, 4, 300, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 257, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = default_scale(d)
    out, lse = kernel.forward(q, k, v, scale)
    ref_out, ref_lse = math.forward(q, k, v, scale)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2.5e-2, rtol=0)
    torch.testing.assert_close(lse.float(), ref_lse.float(), atol=2.5e-2, rtol=0)
    dout = torch.randn_like(out)
    grads = kernel.backward(dout, q, k, v, out, lse, scale)
    ref_grads = math.backward(dout, q, k, v, ref_out, ref_lse, scale)
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 2e-2
    # ring attention's backward: each key block with the merged output and log-sum-exp
    k2, v2 = (torch.randn(2, 4, 190, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    full_out, full_lse = math.forward(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2), scale)
    ref_full = math.backward(dout, q, torch.cat([k, k2], 2), torch.cat([v, v2], 2), full_out, full_lse, scale)
    dq1, dk1, dv1 = kernel.backward(dout, q, k, v, full_out, full_lse, scale)
    dq2, dk2, dv2 = kernel.backward(dout, q, k2, v2, full_out, full_lse, scale)
    assert _rel(dq1.float() + dq2.float(), ref_full[0]) < 2e-2
    assert _rel(torch.cat([dk1, dk2], 2), ref_full[1]) < 2e-2
    assert _rel(torch.cat([dv1, dv2], 2), ref_full[2]) < 2e-2


@pytest.mark.parametrize("name", ["flash", "cudnn"])
def test_a_named_kernel_is_the_one_that_runs(name, monkeypatch):
    """--attention-kernel flash / cudnn without CP: that kernel (no other, as torch's SDPA would pick)
    runs forward and backward, and gives SDPA's output and gradients."""
    from mm.parallel import attention
    from mm.parallel.attention import CoreAttention

    monkeypatch.setattr(attention, "get_attention_options", lambda: {"kernel": name, "algo": None, "overlap": False})
    torch.manual_seed(0)
    q, k, v = (torch.randn(300, 2, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = CoreAttention()(q, k, v)
        out.float().square().sum().backward()
        torch.cuda.synchronize()
    kernels = [e.key.lower() for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    cudnn = [k for k in kernels if "cudnn" in k]
    assert cudnn if name == "cudnn" else not cudnn, kernels
    if name == "flash":
        assert any("flash" in k for k in kernels), kernels
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))
    ref.permute(2, 0, 1, 3).reshape(300, 2, -1).float().square().sum().backward()
    torch.testing.assert_close(out.float(), ref.permute(2, 0, 1, 3).reshape(300, 2, -1).float(), atol=2e-2, rtol=0)
    for g, t in zip(grads, (q, k, v)):
        assert _rel(g, t.grad) < 2e-2
