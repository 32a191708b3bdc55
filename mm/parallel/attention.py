"""Core attention: softmax(q k^T / sqrt(d)) v over local heads, the one slot context parallelism
plugs into.

Layers call ``CoreAttention`` with ``[s, b, n, d]`` query/key/value (``n`` = heads on this TP rank)
and get ``[s, b, n * d]`` back. Without context parallelism (or for cross-attention, whose keys
are the whole text on every rank) it is one kernel call: torch's SDPA, which picks its fastest
kernel under ``auto``; a kernel --attention-kernel names is called itself (aten's flash / cuDNN / math
SDPA op, with its own backward; flash3 through mm.parallel.context_parallel.local_attention). With
``context_parallel=True`` and CP > 1 the queries, keys and values are this rank's shard of the
sequence, and the run's --context-parallel-algo decides how the other shards are reached
(mm.parallel.context_parallel). ``valid_tokens`` is the unpadded global sequence length when the
sequence was padded to a multiple of CP: padded keys then take no part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu

from mm.accelerator.attention_kernels import default_scale, get_kernel
from mm.parallel import context_parallel as cp
from mm.parallel.state import get_attention_options, get_group, get_group_ranks, get_parallel_sizes


def _ring_spec() -> cp.RingSpec:
    sizes = get_parallel_sizes()
    spec = cp.RingSpec(group=get_group("ring"), ranks=get_group_ranks("ring"), window=sizes.cp_window_size)
    if spec.window > 1:
        spec.inner_group, spec.inner_ranks = get_group("cp_inner_window"), get_group_ranks("cp_inner_window")
        spec.outer_group, spec.outer_ranks = get_group("cp_outer_window"), get_group_ranks("cp_outer_window")
    return spec


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_tokens: int | None = None,
                               kernel=None) -> torch.Tensor:
    """Attention over the whole CP-sharded sequence for this rank's ``[b, n, s_local, d]`` shard."""
    options = get_attention_options()
    kernel = kernel or get_kernel(options["kernel"], q.dtype)
    scale = default_scale(q.shape[-1])
    cp_size = mpu.get_context_parallel_world_size()
    s_local = q.shape[2]
    total = valid_tokens if valid_tokens is not None else s_local * cp_size
    algo = options["algo"]
    if cp_size == 1:
        return cp.local_attention(q, k[:, :, :total], v[:, :, :total], kernel, scale)
    if algo == "ulysses_cp_algo":
        return cp.ulysses_attention(q, k, v, get_group("ulysses"), kernel, scale, total)
    spec = _ring_spec()
    if algo == "megatron_cp_algo":
        valid = cp.shard_valid_counts(total, s_local, spec.size)
        return cp.ring_attention(q, k, v, spec, kernel, scale, valid, options["overlap"])
    u = get_parallel_sizes().ulysses_degree
    valid = cp.shard_valid_counts(total, s_local * u, spec.size)
    return cp.ulysses_attention(q, k, v, get_group("ulysses"), kernel, scale, total, ring=spec, ring_valid=valid,
                                overlap=options["overlap"])


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's SDPA on ``[b, n, s, d]``: cuDNN's kernel for bf16 at DiT lengths on Hopper."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


class CoreAttention(torch.nn.Module):
    """Bidirectional attention over the local heads (DiT attention has no mask)."""

    def __init__(self, context_parallel: bool = False):
        super().__init__()
        self.context_parallel = context_parallel

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                valid_tokens: int | None = None) -> torch.Tensor:
        # [s, b, n, d] -> [b, n, s, d], and back to [s, b, n * d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.context_parallel and (mpu.get_context_parallel_world_size() > 1 or valid_tokens is not None):
            out = context_parallel_attention(q, k, v, valid_tokens)
        else:  # one device's whole sequence
            name = get_attention_options()["kernel"]
            kernel = get_kernel(name, q.dtype)
            if not kernel.torch_sdpa:
                out = cp.local_attention(q, k, v, kernel, default_scale(q.shape[-1]))
            elif name != "auto" and hasattr(kernel, "attention"):  # the kernel named, and no other
                out = kernel.attention(q, k, v, default_scale(q.shape[-1]))
            else:  # torch picks its fastest fused kernel
                out = fused_attention(q, k, v)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
