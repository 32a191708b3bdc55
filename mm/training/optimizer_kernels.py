"""Faster stand-ins for megatron-core's optimizer fallbacks when neither transformer-engine nor apex
is installed.

Without them megatron-core 0.19 steps with ``torch.optim.AdamW`` in its default (foreach) mode and
computes the gradient norm for --clip-grad with ``local_multi_tensor_l2_norm``, which reads every
parameter's norm back to the host one at a time (a host sync per tensor, hundreds per step), and
scales gradients one tensor at a time. ``use_torch_kernels`` replaces those with torch's own
multi-tensor kernels: the norm as one ``_foreach_norm`` plus a device-side reduction (no host
sync; megatron reads the total once, as with apex), scaling as ``_foreach_mul``, and the Adam step
as torch's fused kernel on devices that have it. Same arithmetic: the norm is the 2-norm of the
per-tensor norms, as megatron's fallback computes it.
"""

from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (``per_tensor=False``): a 1-element fp32 tensor on
    the tensors' device holding the 2-norm of all of them; nothing is read back to the host."""
    tensors = [t for t in tensor_lists[0] if t.numel() > 0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=tensor_lists[0][0].device if tensor_lists[0] else "cpu"), None
    norms = torch._foreach_norm(tensors, 2.0)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` for each pair of tensors."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [part.optimizer for part in parts if isinstance(getattr(part, "optimizer", None), torch.optim.Optimizer)]


def use_torch_kernels(optimizer, fused_adam: bool) -> bool:
    """Switch a megatron optimizer built on the torch fallbacks to torch's multi-tensor kernels (see
    the module doc); ``fused_adam`` (the accelerator's ``fused_adam``) also moves Adam to torch's
    fused kernel, for parameters on a device type torch has it for. Returns False, changing nothing,
    where transformer-engine or apex provide the kernels."""
    import megatron.core.optimizer as megatron_optimizer
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer_module

    if not getattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False):
        return False
    from megatron.core import utils

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = foreach_scale
    if getattr(megatron_optimizer_module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
        megatron_optimizer_module.multi_tensor_scale_impl = foreach_scale
    if not fused_adam:
        return True
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    fused_devices = set(_get_fused_kernels_supported_devices())
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        # the checks torch's constructor makes for fused=True
        if not params or any(p.device.type not in fused_devices or not torch.is_floating_point(p) for p in params):
            continue
        if any(group.get("differentiable") or group.get("capturable") for group in inner.param_groups):
            continue
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
        inner.register_step_pre_hook(_steps_on_device)
    return True


def _steps_on_device(inner: torch.optim.Optimizer, args, kwargs) -> None:
    """The fused kernel keeps each parameter's step count on the parameter's device; state restored
    from a checkpoint written by the foreach kernel (a host tensor) is moved there before the step."""
    for group in inner.param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            step = inner.state.get(p, {}).get("step")
            if step is not None and (not torch.is_tensor(step) or step.device != p.device):
                inner.state[p]["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
