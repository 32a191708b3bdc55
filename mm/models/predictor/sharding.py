"""A DiT in megatron-core's distributed-checkpoint vocabulary: every tensor of one pipeline stage as
a ``ShardedTensor`` whose key and global shape do not depend on TP, PP or VPP.

Keys are the mm names of the family's weight table (``name_table.NameTable``) with layers under
their global index (``blocks.{layer_offset + i}``), so a checkpoint written by any layout names the
same tensors.
The table also says how TP splits each tensor: "column" along axis 0, "row" along axis 1, None
replicated. A fused tensor (a row with several source keys: self-attention q/k/v, cross-attention
k/v and image k/v) holds on TP rank r the concatenation ``[a_r; b_r; ...]`` of its parts' slices;
its global form is ``[n_parts, out, ...]`` with TP splitting axis 1, which is the same tensor for
every TP size. It is described by a ``ShardedTensorFactory`` around the parameter itself (not a
view of it), because megatron-core's optimizers find a parameter's sharding by identity and build
their state's sharding with the same factory.

``replica_id`` follows megatron-core's ``(pipeline, tensor, data)`` convention: a replicated tensor
is written by TP rank 0 of DP x CP rank 0, a TP-split one by DP x CP rank 0 of each TP rank.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state as mpu
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from mm.models.predictor.name_table import global_name

_SPLIT_AXIS = {"column": 0, "row": 1}


def _fused_factory(key: str, param: torch.Tensor, parts: int, offsets: tuple, tp_rank: int, tp_size: int,
                   replica_id: tuple) -> ShardedTensorFactory:
    """``[parts * n, ...]`` local (this rank's slice of each part, concatenated) <-> global
    ``[parts, n * tp, ...]``."""
    prepend = len(offsets)

    def build(key_, tensor, replica_id_, _flattened_range):
        view = tensor.view(parts, tensor.shape[0] // parts, *tensor.shape[1:])
        return ShardedTensor.from_rank_offsets(key_, view, *offsets, (prepend + 1, tp_rank, tp_size),
                                               replica_id=replica_id_, prepend_axis_num=prepend)

    def merge(loaded: torch.Tensor) -> torch.Tensor:
        return loaded.reshape(-1, *loaded.shape[2:])

    return ShardedTensorFactory(key, param, build, merge, replica_id)


def layout_free_sharded_state_dict(model: torch.nn.Module, rule_for: Callable, prefix: str = "",
                                   sharded_offsets: tuple = (), metadata: dict | None = None) -> ShardedStateDict:
    """``{prefix + local name: ShardedTensor | ShardedTensorFactory | LocalNonpersistentObject}``
    for one pipeline stage of a DiT (``model.layer_offset``; embedders on the first stage, head on the
    last). Dict keys are the module's own state-dict names, so ``model.load_state_dict`` takes the
    loaded dict; the tensors' checkpoint keys are the global names behind ``prefix``.
    ``sharded_offsets``: ``(axis, offset, fragments)`` of axes a caller prepends, as megatron-core
    modules take them; ``metadata['dp_cp_group']``: the group whose rank 0 writes (megatron's).
    ``rule_for``: the family's name-table lookup, global name -> (row, ...); a row has ``split``
    ("column", "row" or None) and ``fused_parts``."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    dp_cp_rank = metadata["dp_cp_group"].rank()
    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    offset = getattr(model, "layer_offset", 0)
    prepend = len(sharded_offsets)
    out: ShardedStateDict = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        local_key = f"{prefix}{name}"
        if name.endswith("._extra_state"):
            # megatron's tensor-parallel linears keep none (they return None); nothing to store
            out[local_key] = LocalNonpersistentObject(tensor)
            continue
        gname = global_name(name, offset)
        key = f"{prefix}{gname}"
        rule, _ = rule_for(gname)
        if rule.split is None:
            out[local_key] = ShardedTensor.from_rank_offsets(
                key, tensor, *sharded_offsets, replica_id=(0, tp_rank, dp_cp_rank), prepend_axis_num=prepend)
            continue
        replica_id = (0, 0, dp_cp_rank)
        parts = rule.fused_parts
        if parts > 1:
            out[local_key] = _fused_factory(key, tensor, parts, sharded_offsets, tp_rank, tp_size, replica_id)
            continue
        axis = _SPLIT_AXIS[rule.split]
        out[local_key] = ShardedTensor.from_rank_offsets(
            key, tensor, *sharded_offsets, (prepend + axis, tp_rank, tp_size), replica_id=replica_id,
            prepend_axis_num=prepend)
    return out
