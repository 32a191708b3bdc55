"""CoreAttention without context parallelism: torch's SDPA for the kernels it can dispatch to, mm's
kernel interface (forward + backward with the log-sum-exp) for one it cannot (flash3 on Hopper)."""

from __future__ import annotations

import torch

from tests.dist_helper import run_distributed


def _attend(rank, world, kernel_name, sdpa_reachable):
    from mm.accelerator import attention_kernels as ak
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from mm.parallel.attention import CoreAttention

    calls = []

    class Recording(ak.MathAttention):  # the math kernel, made to look like one SDPA cannot reach
        name = kernel_name
        torch_sdpa = sdpa_reachable

        def forward(self, q, k, v, scale):
            calls.append("forward")
            return super().forward(q, k, v, scale)

        def backward(self, dout, q, k, v, out, lse, scale):
            calls.append("backward")
            return super().backward(dout, q, k, v, out, lse, scale)

    ak.KERNELS[kernel_name] = Recording
    original = ak.kernels_for
    ak.kernels_for = lambda accelerator: [kernel_name, *original(accelerator)]
    try:
        initialize_parallel(ParallelSizes(world_size=1), seed=0, attention_kernel=kernel_name)
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(20, 2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = CoreAttention()(q, k, v)
        out.square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        return out.detach(), grads, calls
    finally:
        ak.kernels_for = original
        del ak.KERNELS[kernel_name]
        destroy_parallel()


def _sdpa_reference():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(20, 2, 3, 16, generator=g, dtype=torch.float64).permute(1, 2, 0, 3).requires_grad_()
               for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.square().sum().backward()
    return out.detach().permute(2, 0, 1, 3).reshape(20, 2, -1), [t.grad.permute(2, 0, 1, 3) for t in (q, k, v)]


def test_a_kernel_sdpa_cannot_reach_runs_through_its_forward_and_backward():
    ((out, grads, calls),) = run_distributed(1, _attend, "outside_sdpa", False)
    ref_out, ref_grads = _sdpa_reference()
    assert calls == ["forward", "backward"]
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_kernels_sdpa_reaches_leave_the_choice_to_sdpa():
    ((out, grads, calls),) = run_distributed(1, _attend, "inside_sdpa", True)
    ref_out, ref_grads = _sdpa_reference()
    assert calls == []
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_a_kernel_run_as_an_autograd_function_keeps_its_gradients_when_compiled():
    """cp.local_attention (a kernel's forward/backward as an autograd function, what flash3 and
    padded sequences use) traced by torch.compile gives the eager gradients (fp64, math kernel)."""
    from mm.accelerator.attention_kernels import MathAttention
    from mm.parallel.context_parallel import local_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 6, dtype=torch.float64, generator=g) for _ in range(3))
    probe = torch.randn(2, 3, 12, 6, dtype=torch.float64, generator=g)

    def attend(q, k, v):
        return local_attention(q, k[:, :, :10], v[:, :, :10], MathAttention(), 0.4)  # 10 real keys of 12

    grads = []
    for fn in (attend, torch.compile(attend, backend="aot_eager")):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*inputs) * probe).sum().backward()
        grads.append([t.grad for t in inputs])
    torch._dynamo.reset()
    assert all(g.abs().max() > 0 for g in grads[0])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


def _compiled_layernorm_worker(rank, world):
    from tests.wan_helpers import inputs, megatron_config, tiny_kwargs

    from mm.accelerator import attention_kernels
    from mm.accelerator.device import get_accelerator
    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    warmed = get_accelerator().name in attention_kernels._KERNELS_FOR
    kwargs = tiny_kwargs(layers=2)
    model = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs, recompute_granularity="selective",
                                                           recompute_modules=["layernorm"])).train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_blocks(backend="aot_eager")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = model(**inputs(kwargs, 1, 4, 4))
    out.sum().backward()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    destroy_parallel()
    return warmed, breaks, saved


def test_a_compiled_layer_with_op_level_recompute_stays_one_graph():
    """A graph break inside the selectively checkpointed region would run the whole region eagerly
    (what a kernel lookup inside the layer did on the GPU): the kernel list is found when the parallel
    state starts, and a compiled Wan layer with --recompute-modules layernorm traces without a break,
    saving the region's matmul outputs (compiled) rather than only the region's inputs (eager)."""
    ((warmed, breaks, saved),) = run_distributed(1, _compiled_layernorm_worker)
    assert warmed
    assert breaks == 0
    rows, ffn = 2 * (1 * 4 * 4 // 4), 40  # batch 2 x 4 tokens
    assert (rows, ffn) in saved, saved  # the FFN input projection's output, kept by the compiled region
