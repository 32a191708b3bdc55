"""mm.training.optimizer_kernels: torch's multi-tensor kernels in place of megatron-core's
per-tensor fallbacks (no transformer-engine / apex)."""

from __future__ import annotations

import copy

import pytest
import torch

from mm.training import optimizer_kernels as ok


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in ((7, 5), (3,), (11, 2, 4), (1,))]


def test_foreach_l2_norm_is_the_norm_of_all_tensors_on_their_device():
    tensors = _tensors()
    total, per_tensor = ok.foreach_l2_norm(2048, None, [tensors], False)
    expected = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    assert per_tensor is None and total.shape == (1,) and total.dtype == torch.float32
    assert total.device == tensors[0].device
    torch.testing.assert_close(total.double(), expected.reshape(1), rtol=1e-6, atol=0)
    # empty tensors take no part
    again, _ = ok.foreach_l2_norm(2048, None, [tensors + [torch.empty(0)]], False)
    torch.testing.assert_close(again, total)


def test_foreach_scale_in_place_and_into_other_tensors():
    src = _tensors(1)
    dst = [torch.zeros_like(t) for t in src]
    ok.foreach_scale(2048, None, [src, dst], 0.25)
    for s, d in zip(src, dst):
        torch.testing.assert_close(d, s * 0.25, rtol=0, atol=0)
    same = [t.clone() for t in src]
    ok.foreach_scale(2048, None, [same, same], -3.0)
    for s, d in zip(src, same):
        torch.testing.assert_close(d, s * -3.0, rtol=0, atol=0)


class _Part:
    """The shape of a megatron optimizer: its torch optimizer as ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def _adam_runs(steps: int, switch: bool, fused: bool = True):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(t) for t in _tensors(2)]
    inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    assert not inner.param_groups[0]["fused"]
    switched = ok.use_torch_kernels(_Part(inner), fused) if switch else None
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + step + i)
        inner.step()
    return params, inner, switched


def test_use_torch_kernels_switches_adam_to_the_fused_kernel_with_the_same_result():
    import megatron.core.optimizer as megatron_optimizer
    from megatron.core.optimizer import clip_grads

    if not megatron_optimizer.USING_PYTORCH_OPTIMIZER:
        pytest.skip("transformer-engine or apex provide megatron's fused optimizer here")
    reference, _, _ = _adam_runs(4, switch=False)
    fused, inner, switched = _adam_runs(4, switch=True)
    assert switched and inner.param_groups[0]["fused"] and not inner.param_groups[0]["foreach"]
    assert clip_grads.l2_norm_impl is ok.foreach_l2_norm and clip_grads.multi_tensor_scale_impl is ok.foreach_scale
    for r, f in zip(reference, fused):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-7)
    # an accelerator without fused_adam keeps the foreach kernel
    _, kept, _ = _adam_runs(1, switch=True, fused=False)
    assert not kept.param_groups[0]["fused"]


def test_fused_steps_restored_from_the_host_are_moved_to_the_parameters():
    params, inner, switched = _adam_runs(2, switch=True)
    if not switched:
        pytest.skip("transformer-engine or apex provide megatron's fused optimizer here")
    state = copy.deepcopy(inner.state_dict())
    for entry in state["state"].values():
        entry["step"] = float(entry["step"])  # as a host number, the way a foreach run may leave it
    inner.load_state_dict(state)
    for group in inner.param_groups:
        group.update(fused=True, foreach=False)
    for p in params:
        p.grad = torch.ones_like(p)
    inner.step()
    for p in params:
        step = inner.state[p]["step"]
        assert torch.is_tensor(step) and step.device == p.device and float(step) == 3.0
