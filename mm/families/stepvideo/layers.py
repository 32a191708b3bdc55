"""Building blocks of the Step-Video-T2V DiT on megatron-core tensor-parallel layers, ``[s, b, h]``.

The tensor-parallel linears, fp32 LayerNorm and sequence-parallel tagging are every DiT's
(``mm/models/predictor/common.py``, which says how TP and SP split the work); each TP rank holds
``num_heads / tp`` whole heads. Step-Video's own parts:

* Fused per-head projections: self-attention's ``proj_qkv`` output is ``[heads, 3 * head_dim]``,
  each head's q, k and v side by side (the release's ``wqkv`` layout, megatron-core's own fused
  layout), and cross-attention's ``proj_kv`` is ``[heads, 2 * head_dim]`` (k then v per head). A
  column-parallel split of these weights gives each rank whole heads, so the release tensors load
  unpermuted.
* q/k RMSNorm per head (one ``[head_dim]`` weight shared by all heads): normalised in fp32, cast
  back, then scaled by the weight. Each TP rank applies the shared weight to its own heads, so its
  gradient is a sum over the TP group; the forward passes the weight through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) so that every
  rank holds the whole gradient with or without SP.
* 3-D RoPE (``rope_tables``): head channels split into frame / row / column parts
  (``channel_split``); within a part, channel ``j`` and ``j + d/2`` share the angle
  ``pos * theta^(-2j/d)`` (``rotate_half`` pairs). As the reference, the angles are computed in
  fp32 and cast to the activation dtype before cos/sin (bf16 activations: bf16 angles), and the
  rotation runs in the activation dtype.
* adaLN-single: each layer adds its ``scale_shift_table [6, h]`` to the shared timestep
  projection (shift/scale/gate for self-attention, then for the FFN); cross-attention has no norm
  and no gate. The modulation is computed in fp32.
* Cross-attention to ``[CLIP tokens ; Step-LLM tokens]`` with a key mask (padding of the LLM
  prompt); no RoPE.

Selective recompute (``--recompute-modules``): ``core_attn`` keeps only the inputs of the attention
kernels (self- and cross-attention), ``mlp`` the FFN with its adaLN-modulated input norm,
``layernorm`` keeps only the matmul and attention outputs and recomputes the rest
(``common.layer_with_recompute``).
Parameters applied to sequence shards but not split by TP (adaLN tables, norm1/norm2) are tagged
``sequence_parallel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from mm.families.stepvideo.config import StepVideoDiTConfig
from mm.models.predictor import common
from mm.models.predictor.common import (
    FP32LayerNorm,
    column_parallel_linear,
    mark_sequence_parallel,
    row_parallel_linear,
    upcast,
)
from mm.parallel.attention import CoreAttention

STEPVIDEO_RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")


def selective_recompute_modules(config: TransformerConfig) -> set[str]:
    """What ``--recompute-granularity selective`` recomputes in a Step-Video layer (megatron's
    ``recompute_modules``, default ``core_attn``)."""
    return common.selective_recompute_modules(config, "the Step-Video DiT", STEPVIDEO_RECOMPUTE_MODULES)


def modulate(norm: FP32LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``norm(x) * (1 + scale) + shift`` in fp32, in ``x``'s dtype."""
    return torch.addcmul(shift, norm.forward_fp32(x), 1 + scale).type_as(x)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` in the gate's (fp32) precision, in ``x``'s dtype."""
    return (x + y * gate).type_as(x)


def rope_tables(arch: StepVideoDiTConfig, frames: int, height: int, width: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[s, 1, 1, head_dim]`` in ``dtype`` for the ``frames x height x width`` grid in
    (frame, row, column) order.

    Part ``a`` of ``channel_split`` (``d`` channels) rotates by position ``p_a`` (frame, row or
    column index from 0): channels ``j`` and ``j + d/2`` by ``p_a * theta^(-2j/d)``. The angles are
    computed in fp32 and cast to ``dtype`` before cos/sin, as the reference does."""
    parts = []
    for size, dim in zip((frames, height, width), arch.channel_split):
        inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
        angles = torch.outer(torch.arange(size, device=device, dtype=torch.float32), inv_freq)
        parts.append(torch.cat([angles, angles], dim=-1).to(dtype))
    grid = torch.cat([
        parts[0][:, None, None, :].expand(frames, height, width, -1),
        parts[1][None, :, None, :].expand(frames, height, width, -1),
        parts[2][None, None, :, :].expand(frames, height, width, -1),
    ], dim=-1).reshape(frames * height * width, 1, 1, -1)
    return grid.cos(), grid.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, split: tuple[int, int, int]) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on ``[s, b, n, d]`` in ``x``'s dtype, ``rotate_half``
    within each part of ``split``: ``(x1, x2) -> (-x2, x1)``."""
    rotated = []
    for part in x.split(list(split), dim=-1):
        first, second = part.chunk(2, dim=-1)
        rotated += [-second, first]
    return x * cos.to(x.dtype) + torch.cat(rotated, dim=-1) * sin.to(x.dtype)


class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over each head's channels with one ``[head_dim]`` weight shared by the heads: the
    normalised value in fp32 (fp64 stays fp64), cast back, times the weight. Under TP the weight's
    gradient is all-reduced over the TP group (each rank holds only its heads)."""

    def __init__(self, head_dim: int, eps: float, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.eps, self.tp_size = eps, tp_size
        self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        weight = self.weight
        if self.tp_size > 1:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        return normed * weight


class _Attention(MegatronModule):
    def __init__(self, arch: StepVideoDiTConfig, config: TransformerConfig, context_parallel: bool):
        super().__init__(config)
        tp = config.tensor_model_parallel_size
        self.heads_per_rank, self.head_dim = arch.num_heads // tp, arch.head_dim
        self.q_norm = HeadRMSNorm(arch.head_dim, arch.attention_norm_eps, tp, config.params_dtype)
        self.k_norm = HeadRMSNorm(arch.head_dim, arch.attention_norm_eps, tp, config.params_dtype)
        self.proj_out = row_parallel_linear(config, arch.hidden_size, arch.hidden_size, bias=False)
        self.core_attention = CoreAttention(context_parallel=context_parallel)
        # core_attn: the kernels are checkpointed here, unless the layer's layernorm region decides
        self.recompute_core_attention = common.checkpoints_attention_kernels(selective_recompute_modules(config))

    def _kernel(self, fn, *tensors):
        if self.recompute_core_attention and self.training:
            return tensor_parallel.checkpoint(fn, False, *tensors)
        return fn(*tensors)


class StepVideoSelfAttention(_Attention):
    """Self-attention over the video tokens: fused per-head q/k/v (column-parallel), per-head q/k
    RMSNorm, 3-D RoPE; context-parallel over CP ranks."""

    def __init__(self, arch: StepVideoDiTConfig, config: TransformerConfig):
        super().__init__(arch, config, context_parallel=True)
        self.channel_split = tuple(arch.channel_split)
        self.proj_qkv = column_parallel_linear(config, arch.hidden_size, 3 * arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                valid_tokens: int | None = None) -> torch.Tensor:
        qkv, _ = self.proj_qkv(x)  # [s, b, heads/tp * 3 * head_dim]
        q, k, v = qkv.unflatten(-1, (self.heads_per_rank, 3 * self.head_dim)).split(self.head_dim, dim=-1)
        q = apply_rope(self.q_norm(q), *rope, self.channel_split)
        k = apply_rope(self.k_norm(k), *rope, self.channel_split)
        out = self._kernel(lambda q_, k_, v_: self.core_attention(q_, k_, v_, valid_tokens), q, k, v)
        out, _ = self.proj_out(out)
        return out


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """``[s, b, n, d]`` queries on ``[L, b, n, d]`` keys/values, ``key_mask [b, 1, 1, L]`` (True =
    attend) -> ``[s, b, n * d]``."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    return out.permute(2, 0, 1, 3).flatten(-2)


class StepVideoCrossAttention(_Attention):
    """Attention from the video tokens to the text context (every rank holds all of it): q
    column-parallel over the video, fused per-head k/v column-parallel over the context, per-head
    q/k RMSNorm, no RoPE; padded context keys masked."""

    def __init__(self, arch: StepVideoDiTConfig, config: TransformerConfig):
        super().__init__(arch, config, context_parallel=False)
        h = arch.hidden_size
        self.proj_q = column_parallel_linear(config, h, h, bias=False)
        self.proj_kv = column_parallel_linear(config, h, 2 * h, gather_sequence=False, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [s, b, h]; context: [L, b, h]; key_mask: [b, 1, 1, L] bool or None (every key real)."""
        q, _ = self.proj_q(x)
        q = self.q_norm(q.unflatten(-1, (self.heads_per_rank, self.head_dim)))
        kv, _ = self.proj_kv(context)
        k, v = kv.unflatten(-1, (self.heads_per_rank, 2 * self.head_dim)).split(self.head_dim, dim=-1)
        k = self.k_norm(k)
        if key_mask is None:
            out = self._kernel(self.core_attention, q, k, v)
        else:
            out = self._kernel(lambda q_, k_, v_: _masked_attention(q_, k_, v_, key_mask), q, k, v)
        out, _ = self.proj_out(out)
        return out


class _GeluProjection(torch.nn.Module):
    """The FFN's input projection (``ff.net.0``, the release's ``GELU`` module holding ``proj``)."""

    def __init__(self, config: TransformerConfig, in_size: int, out_size: int):
        super().__init__()
        self.proj = column_parallel_linear(config, in_size, out_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.proj(x)
        return F.gelu(hidden, approximate="tanh")


class StepVideoFeedForward(MegatronModule):
    """``Linear(h, 4h) -> GELU(tanh) -> Linear(4h, h)``, no biases; ``net`` = [projection + GELU,
    identity, output projection] as the release names them (``ff.net.0.proj``, ``ff.net.2``)."""

    def __init__(self, arch: StepVideoDiTConfig, config: TransformerConfig):
        super().__init__(config)
        h = arch.hidden_size
        self.net = torch.nn.ModuleList([_GeluProjection(config, h, 4 * h), torch.nn.Identity(),
                                        row_parallel_linear(config, 4 * h, h, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.net[2](self.net[0](x))
        return out


class StepVideoLayer(MegatronModule):
    """One DiT block: adaLN-modulated self-attention, cross-attention (no norm, no gate),
    adaLN-modulated FFN, with the layer's ``scale_shift_table [6, h]`` added to the shared timestep
    projection."""

    def __init__(self, arch: StepVideoDiTConfig, config: TransformerConfig, layer_number: int):
        super().__init__(config)
        h, dtype = arch.hidden_size, config.params_dtype
        self.layer_number = layer_number
        self.norm1 = FP32LayerNorm(h, eps=arch.block_norm_eps, elementwise_affine=True, dtype=dtype)
        self.attn1 = StepVideoSelfAttention(arch, config)
        self.attn2 = StepVideoCrossAttention(arch, config)
        self.norm2 = FP32LayerNorm(h, eps=arch.block_norm_eps, elementwise_affine=True, dtype=dtype)
        self.ff = StepVideoFeedForward(arch, config)
        self.scale_shift_table = torch.nn.Parameter(torch.randn(6, h, dtype=dtype) / h**0.5)
        for part in (self.norm1, self.norm2, self.scale_shift_table):
            mark_sequence_parallel(part, config.sequence_parallel)
        self.recompute = selective_recompute_modules(config)  # common.layer_with_recompute

    def _ffn(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.ff(modulate(self.norm2, x, shift, scale))

    def _attention_blocks(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                          context_mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                          valid_tokens: int | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
        attn = self.attn1(modulate(self.norm1, x, shift_msa, scale_msa), rope, valid_tokens)
        x = gated_residual(x, attn, gate_msa)
        return x + self.attn2(x, context, context_mask)

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                valid_tokens: int | None = None) -> torch.Tensor:
        """x: [s, b, h] (a sequence shard under SP/CP); time_mod: [1, b, 6, h]; context: [L, b, h];
        context_mask: [b, 1, 1, L] bool or None; rope: this CP shard's tables; valid_tokens: the
        unpadded video length when the sequence was padded."""
        mod = upcast(self.scale_shift_table) + upcast(time_mod)  # [1, b, 6, h]
        return common.layer_with_recompute(
            self._attention_blocks, self._ffn, gated_residual, (x, mod, context, context_mask, rope, valid_tokens),
            (mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]), self.recompute, self.training and torch.is_grad_enabled())
