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
