"""megatron-core's ``TransformerConfig`` for a DiT predictor from the run's flags: what training
and inference both build their predictor with."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


def params_dtype(args) -> torch.dtype:
    """The parameters' dtype the precision flags ask for (``--bf16``, ``--fp16``, else fp32)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args, arch, on_cpu: bool, vpp: int | None = None) -> TransformerConfig:
    """megatron-core's config for the DiT from the flags (parallel sizes, precision, recompute).

    Pipeline stages exchange a StageMessage whose length depends on the resolution, so shapes always
    travel with it (``variable_seq_lengths``); interleaved schedules overlap their p2p (megatron's
    default), the plain 1F1B batches it."""
    pp = args.pipeline_model_parallel_size
    return TransformerConfig(
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        variable_seq_lengths=pp > 1, overlap_p2p_comm=pp > 1 and vpp is not None,
        batch_p2p_comm=not (pp > 1 and vpp is not None),
        moe_token_dispatcher_type="alltoall",  # no MoE; megatron asks for it with variable_seq_lengths
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        params_dtype=params_dtype(args), bf16=args.bf16, fp16=args.fp16, pipeline_dtype=params_dtype(args),
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, recompute_modules=args.recompute_modules,
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False)
