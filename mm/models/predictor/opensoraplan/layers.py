"""Building blocks of the Open-Sora-Plan v1.3 DiT on megatron-core tensor-parallel layers, ``[s, b, h]``.

The tensor-parallel linears, norms and sequence-parallel tagging are every DiT's
(``mm/models/predictor/common.py``); what differs is the attention:

* 3-D RoPE with ``rotate_half`` pairs: the head channels split into three equal parts rotated by
  frame, row and column position (each part's first half paired with its second half).
* The v1.3 sparse 1-D pattern: in a sparse layer the sequence is cut into ``n`` groups that attend
  only within themselves. Strided groups (even layers): token ``i`` is in group ``i % n``;
  block groups (odd layers): token ``i`` is in group ``(i // n) % n``. The groups are folded into
  the batch (``[s, b] -> [s/n, n*b]``), attention runs, and the fold is undone. Cross-attention is
  the same with or without the fold, so it is never folded.
* Masks: the caption mask is an additive ``-10000`` bias on the text keys, as in the reference;
  video keys beyond the real tokens (padding) take no part.

Context parallelism with the sparse pattern: each CP rank holds a contiguous shard of the
sequence whose length is a multiple of ``n**2`` (the model pads the sequence so). Folding such a
shard locally gives, for every group, a contiguous shard of that group's sequence, in rank order:
the folded problem is again ``n * b`` ordinary sequences split contiguously over the CP ranks, so
mm's Ulysses / ring / hybrid attention run on it unchanged. Padding is a suffix of every group's
sequence, of a length that depends on the group; groups with equal real lengths are attended in
one call.

Selective recompute (``--recompute-modules``) as in the Wan layer: ``core_attn`` keeps only the
inputs of the attention kernels (self-attention, video-mask attention and cross-attention) and runs
them again in backward, ``mlp`` does so for the FFN with its adaLN-modulated input norm,
``layernorm`` keeps only the matmul and attention outputs and recomputes the rest (norms,
modulation, RoPE, the sparse fold, GELU, residuals; ``common.op_level_checkpoint``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from mm.models.predictor import common
from mm.models.predictor.common import (
    FP32LayerNorm,
    column_parallel_linear,
    mark_sequence_parallel,
    row_parallel_linear,
    upcast,
)
from mm.models.predictor.opensoraplan.config import OpenSoraPlanDiTConfig
from mm.parallel.attention import CoreAttention

MASKED_BIAS = -10000.0  # the reference's additive bias for a masked key
PADDING_BIAS = -9980.0  # the reference's bias for keys of sparse-pattern padding


OSP_RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")


def selective_recompute_modules(config: TransformerConfig) -> set[str]:
    """What ``--recompute-granularity selective`` recomputes in an Open-Sora-Plan layer (megatron's
    ``recompute_modules``, default ``core_attn``)."""
    return common.selective_recompute_modules(config, "the Open-Sora-Plan DiT", OSP_RECOMPUTE_MODULES)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[b, heads, s, d]`` attention with an additive key bias (or none)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))


def rope_tables(osp: OpenSoraPlanDiTConfig, frames: int, height: int, width: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[s, 1, 1, head_dim]`` for the ``frames x height x width`` grid in (t, h, w) order.

    Channels ``[a*D, (a+1)*D)`` of a head belong to axis ``a`` (``D = head_dim / 3``); within a part,
    channel ``j`` and ``j + D/2`` share the angle ``pos / scale_a * theta^(-2j/D)``."""
    part = osp.head_dim // 3
    inv_freq = 1.0 / (osp.rope_theta ** (torch.arange(0, part, 2, dtype=torch.float64, device=device) / part))
    angles = []
    for size, scale in zip((frames, height, width), osp.interpolation_scale):
        a = torch.outer(torch.arange(size, dtype=torch.float64, device=device) / scale, inv_freq)
        angles.append(torch.cat([a, a], dim=-1))
    grid = torch.cat([
        angles[0][:, None, None, :].expand(frames, height, width, -1),
        angles[1][None, :, None, :].expand(frames, height, width, -1),
        angles[2][None, None, :, :].expand(frames, height, width, -1),
    ], dim=-1).reshape(frames * height * width, 1, 1, -1)
    return grid.cos(), grid.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[s, b, n, d]`` by the tables: in each of the three parts, ``(x1, x2) -> (-x2, x1)``."""
    xf = upcast(x)
    halves = xf.reshape(*xf.shape[:-1], 3, 2, -1)
    rotated = torch.stack([-halves[..., 1, :], halves[..., 0, :]], dim=-2).flatten(-3)
    return (xf * cos.to(xf.dtype) + rotated * sin.to(xf.dtype)).type_as(x)


def sparse_fold(x: torch.Tensor, n: int, block: bool) -> torch.Tensor:
    """``[s, b, ...] -> [s/n, n*b, ...]``: group ``g`` of the sequence becomes batch rows ``g*b..``.
    ``s`` must be a multiple of ``n**2`` (block groups) or ``n`` (strided)."""
    s, b = x.shape[0], x.shape[1]
    if not block:  # token i = p*n + g
        return x.reshape(s // n, n * b, *x.shape[2:])
    # token i = a*n*n + g*n + k -> group g, position a*n + k
    y = x.reshape(s // (n * n), n, n, *x.shape[1:]).transpose(1, 2)  # [a, k, g, b, ...]
    return y.reshape(s // n, n * b, *x.shape[2:])


def sparse_unfold(x: torch.Tensor, n: int, block: bool) -> torch.Tensor:
    """Inverse of ``sparse_fold``."""
    p, nb = x.shape[0], x.shape[1]
    b = nb // n
    if not block:
        return x.reshape(p * n, b, *x.shape[2:])
    y = x.reshape(p // n, n, n, b, *x.shape[2:]).transpose(1, 2)  # [a, g, k, b, ...]
    return y.reshape(p * n, b, *x.shape[2:])


def group_valid_counts(valid_tokens: int, padded_tokens: int, n: int, block: bool) -> tuple[int, ...]:
    """Real tokens in each of the ``n`` groups of a ``padded_tokens``-long sequence whose first
    ``valid_tokens`` are real; each group's real tokens are a prefix of it. Integer arithmetic only
    (no tensors: a compiled layer traces it as constants)."""
    counts = []
    for g in range(n):
        if not block:  # group g holds tokens p*n + g, p < padded/n
            counts.append(min(max((valid_tokens - g + n - 1) // n, 0), padded_tokens // n))
            continue
        # group g holds tokens a*n*n + g*n + k (k < n) for a < padded/n**2: whole runs of n below
        # the first run that reaches valid_tokens, part of that run, none after it
        rest, runs = valid_tokens - g * n, padded_tokens // (n * n)
        if rest <= 0:
            counts.append(0)
            continue
        whole = rest // (n * n)
        counts.append(n * min(whole, runs) + (min(rest % (n * n), n) if whole < runs else 0))
    return tuple(counts)


class _AttentionBase(MegatronModule):
    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        # core_attn: the kernels are checkpointed here, unless the layer's layernorm region decides
        self.recompute_core_attention = common.checkpoints_attention_kernels(selective_recompute_modules(config))

    def _kernel(self, fn, *tensors: torch.Tensor | None) -> torch.Tensor:
        """``fn(*tensors)``, an attention kernel; under selective ``core_attn`` recompute only its
        inputs are kept and it runs again in backward (no randomness inside: dropout is 0)."""
        if self.recompute_core_attention and self.training:
            return tensor_parallel.checkpoint(fn, False, *tensors)
        return fn(*tensors)


class OpenSoraPlanSelfAttention(_AttentionBase):
    """Self-attention over video tokens: fused column-parallel q/k/v, 3-D RoPE, the layer's sparse
    pattern, context-parallel over CP ranks, row-parallel output."""

    def __init__(self, osp: OpenSoraPlanDiTConfig, config: TransformerConfig, sparse_n: int, block_groups: bool):
        super().__init__(config)
        h = osp.hidden_size
        self.heads_per_rank = osp.num_heads // config.tensor_model_parallel_size
        self.head_dim = osp.head_dim
        self.sparse_n, self.block_groups = sparse_n, block_groups
        self.linear_qkv = column_parallel_linear(config, h, 3 * h, bias=osp.attention_q_bias)
        self.core_attention = CoreAttention(context_parallel=True)
        self.linear_proj = row_parallel_linear(config, h, h)

    def _attend(self, q, k, v, valid_tokens):
        return self._kernel(lambda q_, k_, v_: self.core_attention(q_, k_, v_, valid_tokens), q, k, v)

    def _attend_groups(self, q, k, v, valid_tokens: int | None, padded_tokens: int) -> torch.Tensor:
        """Folded ``[s/n, n*b, heads, d]`` -> ``[s/n, n*b, heads*d]``, each group over its real keys."""
        n = self.sparse_n
        if valid_tokens is None:
            return self._attend(q, k, v, None)
        counts = group_valid_counts(valid_tokens, padded_tokens, n, self.block_groups)
        b = q.shape[1] // n
        outs, start = [], 0
        while start < n:  # runs of groups with the same number of real keys
            end = start + 1
            while end < n and counts[end] == counts[start]:
                end += 1
            rows = slice(start * b, end * b)
            full = counts[start] == padded_tokens // n
            outs.append(self._attend(q[:, rows], k[:, rows], v[:, rows], None if full else counts[start]))
            start = end
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], valid_tokens: int | None,
                padded_tokens: int, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[s, b, h]`` (this CP rank's shard; under SP its TP slice); ``valid_tokens``: the real
        global length when ``padded_tokens`` include padding; ``key_bias``: ``[b, padded_tokens]``
        additive bias of the video keys (a video mask; one CP rank only)."""
        qkv, _ = self.linear_qkv(x)  # [s, b, 3h/tp]
        q, k, v = (t.reshape(*t.shape[:-1], self.heads_per_rank, self.head_dim) for t in qkv.chunk(3, dim=-1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        n, block = self.sparse_n, self.block_groups
        if n > 1:
            q, k, v = (sparse_fold(t, n, block) for t in (q, k, v))
        if key_bias is None:
            out = self._attend_groups(q, k, v, valid_tokens, padded_tokens)
        else:
            bias = key_bias.transpose(0, 1)
            bias = (sparse_fold(bias, n, block) if n > 1 else bias).transpose(0, 1)[:, None, None, :]
            qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
            out = self._kernel(_masked_attention, qb, kb, vb, bias)
            out = out.permute(2, 0, 1, 3).flatten(-2)
        if n > 1:
            out = sparse_unfold(out, n, block)
        out, _ = self.linear_proj(out)
        return out


class OpenSoraPlanCrossAttention(_AttentionBase):
    """Attention from video tokens to the projected caption, with the caption mask as a bias."""

    def __init__(self, osp: OpenSoraPlanDiTConfig, config: TransformerConfig):
        super().__init__(config)
        h = osp.hidden_size
        self.heads_per_rank = osp.num_heads // config.tensor_model_parallel_size
        self.head_dim = osp.head_dim
        self.linear_q = column_parallel_linear(config, h, h, bias=osp.attention_q_bias)
        self.linear_kv = column_parallel_linear(config, h, 2 * h, gather_sequence=False, bias=osp.attention_k_bias)
        self.linear_proj = row_parallel_linear(config, h, h)

    def forward(self, x: torch.Tensor, context: torch.Tensor, text_bias: torch.Tensor | None) -> torch.Tensor:
        """x: [s, b, h]; context: [L, b, h]; text_bias: [b, 1, 1, L] or None."""
        q, _ = self.linear_q(x)
        kv, _ = self.linear_kv(context)
        k, v = kv.chunk(2, dim=-1)
        q, k, v = (t.reshape(*t.shape[:-1], self.heads_per_rank, self.head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        out = self._kernel(_masked_attention, q, k, v, text_bias)
        out, _ = self.linear_proj(out.permute(2, 0, 1, 3).flatten(-2))
        return out


class OpenSoraPlanMLP(MegatronModule):
    def __init__(self, osp: OpenSoraPlanDiTConfig, config: TransformerConfig):
        super().__init__(config)
        self.linear_fc1 = column_parallel_linear(config, osp.hidden_size, 4 * osp.hidden_size)
        self.linear_fc2 = row_parallel_linear(config, 4 * osp.hidden_size, osp.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(F.gelu(hidden, approximate="tanh"))
        return out


class OpenSoraPlanLayer(MegatronModule):
    """One v1.3 block: adaLN-single-modulated sparse self-attention, plain cross-attention (no
    norm), adaLN-modulated FFN. ``scale_shift_table`` ``[6, h]`` is added to the shared timestep
    projection: shift/scale/gate for self-attention, then for the FFN."""

    def __init__(self, osp: OpenSoraPlanDiTConfig, config: TransformerConfig, layer_number: int):
        super().__init__(config)
        h = osp.hidden_size
        self.layer_number = layer_number  # global, 0-based: decides the sparse pattern
        sparse_n, block = osp.layer_sparsity(layer_number)
        affine = osp.norm_elementwise_affine
        self.norm1 = FP32LayerNorm(h, eps=osp.norm_eps, elementwise_affine=affine, dtype=config.params_dtype)
        self.self_attention = OpenSoraPlanSelfAttention(osp, config, sparse_n, block)
        self.cross_attention = OpenSoraPlanCrossAttention(osp, config)
        self.norm2 = FP32LayerNorm(h, eps=osp.norm_eps, elementwise_affine=affine, dtype=config.params_dtype)
        self.mlp = OpenSoraPlanMLP(osp, config)
        self.scale_shift_table = torch.nn.Parameter(torch.randn(6, h, dtype=config.params_dtype) / h**0.5)
        for part in (self.scale_shift_table, self.norm1, self.norm2):
            mark_sequence_parallel(part, config.sequence_parallel)
        self.recompute = selective_recompute_modules(config)  # common.layer_with_recompute

    def _ffn(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.mlp((upcast(self.norm2(x)) * (1 + scale) + shift).type_as(x))

    @staticmethod
    def _residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (upcast(x) + upcast(y) * gate).type_as(x)

    def _attention_blocks(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                          text_bias: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                          valid_tokens: int | None, padded_tokens: int, key_bias: torch.Tensor | None) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
        normed = (upcast(self.norm1(x)) * (1 + scale_sa) + shift_sa).type_as(x)
        x = self._residual(x, self.self_attention(normed, rope, valid_tokens, padded_tokens, key_bias), gate_sa)
        return x + self.cross_attention(x, context, text_bias)

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, context: torch.Tensor, text_bias: torch.Tensor | None,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor, *, valid_tokens: int | None, padded_tokens: int,
                key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [s, b, h] (a sequence shard under SP/CP); time_mod: [1, b, 6, h]; context: [L, b, h];
        text_bias: [b, 1, 1, L]; rope tables of this CP shard's tokens."""
        # shift/scale/gate of self-attention, then of the FFN, in fp32
        mod = upcast(self.scale_shift_table) + upcast(time_mod)  # [1, b, 6, h]
        args = (x, mod, context, text_bias, (rope_cos, rope_sin), valid_tokens, padded_tokens, key_bias)
        return common.layer_with_recompute(self._attention_blocks, self._ffn, self._residual, args,
                                           (mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]), self.recompute,
                                           self.training and torch.is_grad_enabled())
