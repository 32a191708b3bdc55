"""Building blocks of the Wan DiT on megatron-core tensor-parallel layers, ``[s, b, h]`` layout.

The tensor-parallel linears, fp32 norms and sequence-parallel tagging are every DiT's
(``mm/models/predictor/common.py``, which says how TP and SP split the work); each TP rank holds
``num_heads / tp`` heads. Wan's own parts: q/k RMSNorm across all heads (``TPRMSNorm``), 3-D RoPE on
interleaved channel pairs, adaLN with fp32 modulation and gated residuals, cross-attention to the
text (and CLIP image) context. Parameters applied to sequence shards but not split by TP (adaLN
tables, the cross-attention norm) are tagged ``sequence_parallel``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
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
from mm.models.predictor.wan.config import WanDiTConfig
from mm.parallel.attention import CoreAttention


def modulate(norm: FP32LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``norm(x) * (1 + scale) + shift`` in fp32 (one fused multiply-add), in ``x``'s dtype."""
    return torch.addcmul(shift, norm.forward_fp32(x), 1 + scale).type_as(x)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` with the sum in the gate's (fp32) precision, in ``x``'s dtype; bf16 operands
    are promoted inside the kernels instead of being copied to fp32 first."""
    return (x + y * gate).type_as(x)


class TPRMSNorm(torch.nn.Module):
    """RMSNorm over the whole hidden size of q or k while each TP rank holds only its heads' part.

    Wan normalises q and k across all heads, so the mean square is summed over the TP group
    (an all-reduce whose backward is again an all-reduce: each rank's loss depends on the
    statistic through its own heads).
    """

    def __init__(self, hidden_size: int, eps: float, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.hidden_size, self.eps, self.tp_size = hidden_size, eps, tp_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size // tp_size, dtype=dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:  # the whole hidden size on this rank: torch's fused kernel (fp32 inside)
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        sum_sq = upcast(x).pow(2).sum(dim=-1, keepdim=True)
        if self.tp_size > 1:
            sum_sq = dist.nn.functional.all_reduce(sum_sq, group=mpu.get_tensor_model_parallel_group())
        normed = upcast(x) * torch.rsqrt(sum_sq / self.hidden_size + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(config: WanDiTConfig, frames: int, height: int, width: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the 3-D RoPE angles for a ``frames x height x width`` token grid: ``[s, 1, 1, d/2]``.

    Head channels are split into frame, row and column parts (``config.rope_dims``); token
    ``(f, y, x)`` of the flattened grid rotates channel pair ``j`` of a part by ``pos * theta^(-2j/n)``.
    Computed from global positions in fp64; the model casts them once to ``rope_dtype``.
    """
    angles = []
    for size, dim in zip((frames, height, width), config.rope_dims):
        freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
        angles.append(torch.outer(torch.arange(size, dtype=torch.float64, device=device), freqs))
    grid = torch.cat([
        angles[0][:, None, None, :].expand(frames, height, width, -1),
        angles[1][None, :, None, :].expand(frames, height, width, -1),
        angles[2][None, None, :, :].expand(frames, height, width, -1),
    ], dim=-1).reshape(frames * height * width, 1, 1, -1)
    return grid.cos(), grid.sin()


def rope_dtype(x: torch.Tensor) -> torch.dtype:
    """RoPE is computed in fp32 (fp64 for fp64 activations), as Wan does."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs ``(x[2j], x[2j+1])`` of ``[s, b, n, d]`` by the tables
    (``rope_dtype`` tables: bf16 pairs are promoted inside the products, not copied to fp32)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(rope_dtype(x)), sin.to(rope_dtype(x))  # no-ops once the model has cast them
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


WAN_RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")


def selective_recompute_modules(config: TransformerConfig) -> set[str]:
    """What ``--recompute-granularity selective`` recomputes in a Wan layer (megatron's
    ``recompute_modules``, default ``core_attn``): ``core_attn`` the attention kernels of self- and
    cross-attention, ``mlp`` the FFN with its adaLN-modulated input norm, ``layernorm`` the norms and all
    else but the matmuls and attention kernels (``common.op_level_checkpoint``)."""
    return common.selective_recompute_modules(config, "the Wan DiT", WAN_RECOMPUTE_MODULES)


class _AttentionBase(MegatronModule):
    def __init__(self, wan: WanDiTConfig, config: TransformerConfig, context_parallel: bool = False):
        super().__init__(config)
        tp = config.tensor_model_parallel_size
        self.heads_per_rank = wan.num_heads // tp
        self.head_dim = wan.head_dim
        h = wan.hidden_size
        self.q_norm = TPRMSNorm(h, wan.eps, tp, config.params_dtype)
        self.k_norm = TPRMSNorm(h, wan.eps, tp, config.params_dtype)
        self.core_attention = CoreAttention(context_parallel=context_parallel)
        self.linear_proj = row_parallel_linear(config, h, h)
        # core_attn: the kernels are checkpointed here, unless the layer's layernorm region decides
        self.recompute_core_attention = common.checkpoints_attention_kernels(selective_recompute_modules(config))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads_per_rank, self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_tokens: int | None = None) -> torch.Tensor:
        if self.recompute_core_attention and self.training:
            return tensor_parallel.checkpoint(lambda q_, k_, v_: self.core_attention(q_, k_, v_, valid_tokens),
                                              False, q, k, v)
        return self.core_attention(q, k, v, valid_tokens)


class WanSelfAttention(_AttentionBase):
    """Self-attention over video tokens: fused column-parallel q/k/v (each rank's slice holds its
    heads' q, k and v), RMSNorm across all heads, 3-D RoPE; context-parallel over CP ranks."""

    def __init__(self, wan: WanDiTConfig, config: TransformerConfig):
        super().__init__(wan, config, context_parallel=True)
        self.linear_qkv = column_parallel_linear(config, wan.hidden_size, 3 * wan.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                valid_tokens: int | None = None) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)  # [s, b, 3h/tp]
        q, k, v = qkv.chunk(3, dim=-1)
        q = apply_rope(self._heads(self.q_norm(q)), *rope)
        k = apply_rope(self._heads(self.k_norm(k)), *rope)
        out, _ = self.linear_proj(self._attend(q, k, self._heads(v), valid_tokens))
        return out


class WanCrossAttention(_AttentionBase):
    """Attention from video tokens to the text context, plus (I2V/FLF2V) to the CLIP image context
    with its own keys/values; the two results are added before the output projection."""

    def __init__(self, wan: WanDiTConfig, config: TransformerConfig):
        super().__init__(wan, config)
        h = wan.hidden_size
        self.linear_q = column_parallel_linear(config, h, h)
        self.linear_kv = column_parallel_linear(config, h, 2 * h, gather_sequence=False)
        self.has_image = wan.image_dim is not None
        if self.has_image:
            self.linear_kv_img = column_parallel_linear(config, h, 2 * h, gather_sequence=False)
            self.k_img_norm = TPRMSNorm(h, wan.eps, config.tensor_model_parallel_size, config.params_dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None) -> torch.Tensor:
        q, _ = self.linear_q(x)
        q = self._heads(self.q_norm(q))
        kv, _ = self.linear_kv(context)
        k, v = kv.chunk(2, dim=-1)
        out = self._attend(q, self._heads(self.k_norm(k)), self._heads(v))
        if self.has_image:
            kv_img, _ = self.linear_kv_img(context_img)
            k_img, v_img = kv_img.chunk(2, dim=-1)
            out = out + self._attend(q, self._heads(self.k_img_norm(k_img)), self._heads(v_img))
        out, _ = self.linear_proj(out)
        return out


class WanMLP(MegatronModule):
    def __init__(self, wan: WanDiTConfig, config: TransformerConfig):
        super().__init__(config)
        self.linear_fc1 = column_parallel_linear(config, wan.hidden_size, wan.ffn_dim)
        self.linear_fc2 = row_parallel_linear(config, wan.ffn_dim, wan.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(F.gelu(hidden, approximate="tanh"))
        return out


class WanLayer(MegatronModule):
    """One DiT block: adaLN-modulated self-attention, cross-attention, adaLN-modulated FFN.

    ``modulation`` is Wan's learned ``[1, 6, h]`` table added to the projected timestep embedding:
    shift/scale/gate for self-attention, then for the FFN.
    """

    def __init__(self, wan: WanDiTConfig, config: TransformerConfig, layer_number: int):
        super().__init__(config)
        h = wan.hidden_size
        self.layer_number = layer_number
        self.norm1 = FP32LayerNorm(h, eps=wan.eps, elementwise_affine=False)
        self.self_attention = WanSelfAttention(wan, config)
        self.cross_attn_norm = (FP32LayerNorm(h, eps=wan.eps, elementwise_affine=True, dtype=config.params_dtype)
                                if wan.cross_attn_norm else torch.nn.Identity())
        self.cross_attention = WanCrossAttention(wan, config)
        self.norm3 = FP32LayerNorm(h, eps=wan.eps, elementwise_affine=False)
        self.mlp = WanMLP(wan, config)
        self.modulation = torch.nn.Parameter(torch.randn(1, 6, h, dtype=config.params_dtype) / h**0.5)
        mark_sequence_parallel(self.modulation, config.sequence_parallel)
        mark_sequence_parallel(self.cross_attn_norm, config.sequence_parallel)
        self.recompute = selective_recompute_modules(config)  # common.layer_with_recompute

    def _ffn(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.mlp(modulate(self.norm3, x, shift, scale))

    def _attention_blocks(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                          context_img: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                          valid_tokens: int | None) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
        normed = modulate(self.norm1, x, shift_sa, scale_sa)
        x = gated_residual(x, self.self_attention(normed, rope, valid_tokens), gate_sa)
        return x + self.cross_attention(self.cross_attn_norm(x), context, context_img)

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, context: torch.Tensor,
                context_img: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                valid_tokens: int | None = None) -> torch.Tensor:
        """x: [s, b, h] (a sequence shard under SP); time_mod: [1, b, 6, h], or [s, b, 6, h] with
        per-token timesteps; context: [L, b, h]; valid_tokens: the unpadded video length when CP
        padded it."""
        # shift/scale/gate of self-attention, then of the FFN, in fp32
        mod = upcast(self.modulation) + upcast(time_mod)  # [1|s, b, 6, h]
        return common.layer_with_recompute(
            self._attention_blocks, self._ffn, gated_residual, (x, mod, context, context_img, rope, valid_tokens),
            (mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]), self.recompute, self.training and torch.is_grad_enabled())
