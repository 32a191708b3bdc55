"""What a training layout allocates per rank before any activation: the DiT's parameters, megatron-core
DDP's gradient buffers and the optimizer's fp32 main parameters and Adam moments.

Exact, not estimated: the model chunks of each pipeline stage are built as the run builds them (the
family's predictor, ``build_model_chunks``'s stage spans) on the meta device at TP 1, each parameter's
share on one TP rank is read from the family's name table (the rule distributed checkpoints shard by),
and the buffers are laid out by megatron-core's own layout code (``DistributedOptimizer``'s padded
layout with ``--use-distributed-optimizer``, the plain one without) with the run's DDP settings
(``mm.training.pretrain.ddp_config_for``). The optimizer's share of a rank follows from the bucket
ranges: megatron shards each bucket evenly over the DP x CP ranks, and a rank keeps fp32 main copies
(bf16/fp16 runs) and Adam's two moments of the parameter elements inside its shard.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed.param_and_grad_buffer import (
    _compute_default_per_buffer_param_layout,
    group_params_for_buffers,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from mm.accelerator import select_accelerator
from mm.arguments import RunConfig
from mm.families import resolve
from mm.models.predictor.name_table import global_name
from mm.models.predictor.pipeline import layer_layout, stage_span
from mm.models.predictor.transformer_config import transformer_config
from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
from mm.training.pretrain import ddp_config_for

GiB = 2**30


@dataclass(frozen=True)
class StaticMemory:
    """Bytes one rank allocates for the model's state (the largest over the ranks of its stage)."""

    params: int      # the DiT's parameters (with the distributed optimizer: DDP's padded parameter buffer)
    grads: int       # DDP's gradient buffers (fp32)
    optimizer: int   # fp32 main parameters (bf16/fp16 runs) and Adam's exp_avg, exp_avg_sq

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True)
class ParamShape:
    name: str         # global name (layers under their global index)
    numel: int        # on one TP rank
    dtype: torch.dtype


@contextmanager
def single_process_groups():
    """megatron-core's parallel state for one process (what building the layers needs), torn down
    afterwards; a caller that has started a process group sets up that state itself (one rank)."""
    if dist.is_initialized():
        yield
        return
    select_accelerator("cpu")  # the layers are built on the meta device; megatron's set-up asks for a device
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            initialize_parallel(ParallelSizes(world_size=1), seed=0)
            yield
        finally:
            destroy_parallel()
            dist.destroy_process_group()


def _tp1_args(args: argparse.Namespace) -> argparse.Namespace:
    one = copy.copy(args)
    one.tensor_model_parallel_size, one.context_parallel_size, one.sequence_parallel = 1, 1, False
    one.pipeline_model_parallel_size = 1
    return one


def stage_parameters(config: RunConfig) -> list[list[list[ParamShape]]]:
    """``[stage][chunk]``: the trainable parameters of each pipeline stage's model chunks, in the order
    the chunk registers them, with their element count on one TP rank."""
    family, arch = resolve(config.model.predictor)
    pred, args = config.model.predictor, config.args
    pp, tp, vpp = config.sizes.pipeline_parallel, config.sizes.tensor_parallel, config.virtual_pipeline_size
    layout = layer_layout(arch.num_layers, pp, vpp, pred.pipeline_num_layers)
    stages = []
    with single_process_groups():
        tf_config = transformer_config(_tp1_args(args), arch, on_cpu=True, vpp=None)
        for stage in range(pp):
            chunks = []
            for chunk in range(len(layout)):
                offset, count = stage_span(layout, stage, chunk)
                with torch.device("meta"):
                    model = family.build_predictor(
                        pred.model_id, arch, tf_config, pre_process=stage == 0 and chunk == 0,
                        post_process=stage == pp - 1 and chunk == len(layout) - 1, layer_offset=offset,
                        num_layers=count)
                shapes = []
                for name, param in model.named_parameters():
                    if not param.requires_grad:
                        continue
                    gname = global_name(name, offset)
                    rule, _ = model.weight_rule(gname)
                    if rule.split is not None and param.numel() % tp:
                        raise ValueError(f"{gname}: {param.numel()} elements do not split over TP {tp}")
                    shapes.append(ParamShape(gname, param.numel() // (tp if rule.split else 1), param.dtype))
                chunks.append(shapes)
            stages.append(chunks)
    return stages


def _bucket_size(ddp_config, dp_cp: int, stage: int, chunk: int) -> int | None:
    # megatron-core's DistributedDataParallel: the default bucket size, no buckets without overlap,
    # one bucket for every chunk but the first and on every stage but the first
    if not ddp_config.overlap_grad_reduce or chunk > 0 or stage > 0:
        return None
    return ddp_config.bucket_size or max(40_000_000, 1_000_000 * dp_cp)


def _chunk_memory(shapes: list[ParamShape], ddp_config, dp_cp: int, bucket_size: int | None,
                  mixed: bool) -> list[tuple[int, int, int]]:
    """(params, grads, optimizer) bytes of one DDP-wrapped chunk for each DP x CP rank."""
    params = [torch.nn.Parameter(torch.empty(s.numel, dtype=s.dtype, device="meta")) for s in shapes]
    per_rank = [[0, 0, 0] for _ in range(dp_cp)]
    for key, (group, _) in group_params_for_buffers(params, ddp_config.grad_reduce_in_fp32).items():
        param_size = torch.empty(0, dtype=key.param_dtype).element_size()
        grad_size = torch.empty(0, dtype=key.grad_dtype).element_size()
        if ddp_config.use_distributed_optimizer:
            layout = DistributedOptimizer._compute_per_buffer_param_layout(group, bucket_size, dp_cp, ddp_config)
        else:
            layout = _compute_default_per_buffer_param_layout(group, bucket_size)
        numel = layout.bucket_indices[-1][1]
        main = 4 if mixed and key.param_dtype != torch.float32 else 0  # fp32 main copies of bf16/fp16 params
        for r in range(dp_cp):
            per_rank[r][1] += numel * grad_size
            if ddp_config.use_distributed_optimizer:
                per_rank[r][0] += numel * param_size  # the parameters live in DDP's parameter buffer
                kept = 0
                for bucket, (start, end) in enumerate(layout.bucket_indices):
                    shard = (end - start) // dp_cp
                    lo, hi = start + r * shard, start + (r + 1) * shard
                    kept += sum(max(0, min(e, hi) - max(s, lo)) for s, e, b in layout.param_index_map.values()
                                if b == bucket)
            else:
                per_rank[r][0] += sum(p.numel() for p in group) * param_size
                kept = sum(p.numel() for p in group)
            per_rank[r][2] += kept * (main + 8)  # + Adam's exp_avg and exp_avg_sq, fp32
    return [tuple(x) for x in per_rank]


def static_memory(config: RunConfig, stages: list[list[list[ParamShape]]] | None = None) -> list[StaticMemory]:
    """Per pipeline stage: what its most loaded rank allocates for parameters, gradient buffers and
    optimizer state (``stages``: ``stage_parameters(config)``, computed when not given)."""
    stages = stage_parameters(config) if stages is None else stages
    ddp_config = ddp_config_for(config.args)
    dp_cp = config.sizes.data_parallel * config.sizes.context_parallel
    mixed = bool(config.args.bf16 or config.args.fp16)
    out = []
    for stage, chunks in enumerate(stages):
        ranks = [[0, 0, 0] for _ in range(dp_cp)]
        for chunk, shapes in enumerate(chunks):
            size = _bucket_size(ddp_config, dp_cp, stage, chunk)
            for r, values in enumerate(_chunk_memory(shapes, ddp_config, dp_cp, size, mixed)):
                ranks[r] = [a + b for a, b in zip(ranks[r], values)]
        out.append(StaticMemory(*max(ranks, key=sum)))
    return out
