"""Building blocks every DiT family shares: fp32 norms and casts, the timestep embedding, the
two-linear MLPs of the embedders, megatron-core's tensor-parallel linears as the DiT layers use
them, sequence-parallel tagging and the ``--recompute-modules`` vocabulary.

Tensor parallelism: q/k/v and FFN-up are column-parallel, attention outputs and FFN-down
row-parallel. Sequence parallelism: between a row-parallel output and the next column-parallel
input activations are split along the sequence; the column-parallel layers all-gather it and the
row-parallel ones reduce-scatter. Cross-attention keys/values read a context every rank holds whole,
so their column-parallel layers skip the all-gather (``gather_sequence=False``). Parameters applied
to sequence shards but not split by TP carry ``sequence_parallel = True``
(``mark_sequence_parallel``) so megatron-core's ``finalize_model_grads`` sums their gradients over
the TP group.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# what ``--recompute-granularity selective --recompute-modules`` may name in a DiT layer:
# ``core_attn`` the attention kernels (self- and cross-attention), ``mlp`` the FFN with its
# adaLN-modulated input norm, ``layernorm`` the norms and everything else that is not a matmul or
# an attention kernel (``op_level_checkpoint``); a family lists the ones its layers implement
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: norms, modulation and RoPE are computed in fp32; fp64 (tests) stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


def mark_sequence_parallel(module_or_param, enabled: bool) -> None:
    """Tag parameters whose gradients are partial sums over sequence shards under SP."""
    params = [module_or_param] if isinstance(module_or_param, torch.nn.Parameter) else module_or_param.parameters()
    for p in params:
        setattr(p, "sequence_parallel", enabled)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[n] -> [n, dim]: cos then sin of ``t * max_period^(-i / (dim/2))``, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class FP32LayerNorm(torch.nn.LayerNorm):
    """LayerNorm computed in fp32, result in the input dtype."""

    def forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised ``x`` in fp32 (fp64 stays fp64), not cast back: adaLN modulates it first."""
        weight = upcast(self.weight) if self.weight is not None else None
        bias = upcast(self.bias) if self.bias is not None else None
        return F.layer_norm(upcast(x), self.normalized_shape, weight, bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fp32(x).type_as(x)


class TwoLayerMLP(torch.nn.Module):
    """``linear_2(activation(linear_1(x)))``: the time, text and caption embedders (replicated)."""

    def __init__(self, in_size: int, hidden: int, out_size: int, activation: Callable, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_size, hidden, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden, out_size, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


def column_parallel_linear(config: TransformerConfig, in_size: int, out_size: int, gather_sequence: bool = True,
                           bias: bool = True) -> tensor_parallel.ColumnParallelLinear:
    """Output features split over TP ranks; ``gather_sequence=False`` for an input every rank holds
    whole (the text context), which needs no sequence all-gather under SP."""
    cfg = config if gather_sequence else dataclasses.replace(config, sequence_parallel=False)
    return tensor_parallel.ColumnParallelLinear(in_size, out_size, config=cfg, init_method=config.init_method,
                                                bias=bias, gather_output=False)


class _RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core 0.19's RowParallelLinear hands ``tp_group=None`` to its matmul, which then
    warns on every call; under torch.compile that warning is a graph break. Pass the layer's group."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def row_parallel_linear(config: TransformerConfig, in_size: int, out_size: int,
                        bias: bool = True) -> tensor_parallel.RowParallelLinear:
    """Input features split over TP ranks (a column-parallel layer's output), the sum all-reduced
    (SP: reduce-scattered along the sequence); the bias (if any) added once after it."""
    return _RowParallelLinear(in_size, out_size, config=config, init_method=config.output_layer_init_method,
                              bias=bias, input_is_parallel=True, skip_bias_add=False)


# what megatron-core's TransformerConfig fills recompute_modules with when none is given
MEGATRON_DEFAULT_MODULES = ["core_attn"]


def selective_recompute_modules(config: TransformerConfig, model: str,
                                valid: Sequence[str] = RECOMPUTE_MODULES) -> set[str]:
    """What ``--recompute-granularity selective`` recomputes in a layer of ``model`` (megatron's
    ``recompute_modules``, default ``core_attn``); ``valid``: what that model's layer can recompute.
    Empty without selective recompute; a module outside ``valid`` is an error naming the flag."""
    if config.recompute_granularity != "selective":
        return set()
    modules = set(config.recompute_modules or ("core_attn",))
    unknown = modules - set(valid)
    if unknown:
        can = (f"{', '.join(valid)} only" if valid else
               "no module selectively (--recompute-granularity full recomputes whole layers)")
        raise ValueError(f"--recompute-modules {' '.join(sorted(unknown))}: {model} recomputes {can}")
    return modules


def checkpoints_attention_kernels(recompute: set[str]) -> bool:
    """Whether an attention module checkpoints its kernels itself: with ``core_attn``, unless the
    layer's ``layernorm`` region (``layer_with_recompute``) already decides what attention keeps."""
    return "core_attn" in recompute and "layernorm" not in recompute


# the matmuls whose outputs op-level recompute keeps (``linear``/``matmul`` reach one of these)
_MATMUL_OPS = frozenset((torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                         torch.ops.aten.baddbmm.default))


def is_attention_kernel(func) -> bool:
    """An attention kernel of ``mm.accelerator.attention_kernels`` (aten's SDPA kernels, flash-attention
    3's custom op, Ascend's fusion attention), by its operator name."""
    name = getattr(func, "name", lambda: str(func))()
    return "attention" in name or "flash_attn" in name


def _op_level_policy(save_attention: bool, ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in _MATMUL_OPS or (save_attention and is_attention_kernel(func)):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def op_level_checkpoint(function: Callable, *args, save_attention: bool = True):
    """``function(*args)`` keeping, for its backward, only the outputs of its matmuls and (with
    ``save_attention``) attention kernels: norms, adaLN modulation, RoPE, activations, residuals and
    casts run again in the backward from those and the inputs (``--recompute-modules layernorm``,
    torch's selective activation checkpointing). Nothing saved is fp32 or FFN-wide but the FFN's
    input projection; in a compiled block the recomputation fuses into the backward's kernels. The
    function must draw no random numbers (the recompute does not restore RNG state)."""
    context_fn = functools.partial(create_selective_checkpoint_contexts,
                                   functools.partial(_op_level_policy, save_attention))
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=context_fn,
                                             preserve_rng_state=False)


def _recompute_everything(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_RECOMPUTE


def module_checkpoint(function: Callable, *args):
    """``function(*args)`` keeping only its inputs for the backward, which runs it again (``mlp``).
    A plain checkpoint inside a compiled layer lets AOT autograd's partitioner keep the outputs of
    matmuls anyway (it does not recompute compute-bound ops unless told to): the FFN input projection's
    output stayed saved and only the activation ran again. Every op is therefore marked
    ``MUST_RECOMPUTE``, which the partitioner obeys; eagerly this is a plain checkpoint. Nothing random
    may run inside (the recompute does not restore RNG state)."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, _recompute_everything)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=context_fn,
                                             preserve_rng_state=False)


def layer_with_recompute(attention_part: Callable[..., torch.Tensor],
                         ffn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                         residual: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                         attention_args: tuple, ffn_mod: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                         recompute: set[str], active: bool) -> torch.Tensor:
    """A DiT layer ``residual(x, ffn(x, shift, scale), gate)`` with ``x = attention_part(*attention_args)``
    (the adaLN-modulated attention blocks with their residuals), under the layer's selective
    recompute (``recompute``: ``selective_recompute_modules``; ``active``: training with gradients).

    ``layernorm`` puts the layer (with ``mlp``: its attention half) in one ``op_level_checkpoint``
    region; ``mlp`` checkpoints the FFN with its modulated input norm (``module_checkpoint``, which also
    recomputes the FFN's matmuls inside a compiled layer; nothing random inside, so no RNG state);
    ``core_attn`` with ``layernorm`` lets the region run the attention kernels again too (without
    ``layernorm`` the attention modules checkpoint their kernels themselves)."""
    shift, scale, gate = ffn_mod
    norms, mlp = active and "layernorm" in recompute, active and "mlp" in recompute
    save_attention = "core_attn" not in recompute
    if norms and not mlp:  # one region: only the layer's matmul and attention outputs are kept
        def whole(shift_, scale_, gate_, *args):
            x_ = attention_part(*args)
            return residual(x_, ffn(x_, shift_, scale_), gate_)
        return op_level_checkpoint(whole, shift, scale, gate, *attention_args, save_attention=save_attention)
    if norms:
        x = op_level_checkpoint(attention_part, *attention_args, save_attention=save_attention)
    else:
        x = attention_part(*attention_args)
    if mlp:
        ff = module_checkpoint(ffn, x, shift, scale)
    else:
        ff = ffn(x, shift, scale)
    return residual(x, ff, gate)
