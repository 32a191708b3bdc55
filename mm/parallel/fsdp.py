"""Parameter sharding, on torch's FSDP2: inference's (Wan's and Phantom's ``t5_fsdp`` / ``dit_fsdp``) and
training's frozen text encoders (the model JSON's ``text_encoder_fsdp``, over pipeline stage 0's ranks).

A model whose forwards every rank of a group runs the same number of times (in inference the DiT
over its context-parallel group and the text encoder over its TP x CP group, on the same inputs; in
training the text encoders over pipeline stage 0, each rank on its own samples), keeps only
1/group-size of its parameters on each rank. Each block of the model's outermost ``ModuleList``s
(the DiT's layers, T5's blocks) is one unit: its parameters are all-gathered right before it runs
and freed right after, so the peak holds one block's full weights besides the shards. The
parameters outside the blocks (embeddings, head) form the root's unit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def outer_blocks(module: nn.Module) -> list[nn.Module]:
    """The children of ``module``'s outermost ModuleLists, in order."""
    blocks: list[nn.Module] = []
    inside: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and not any(name.startswith(f"{p}.") for p in inside):
            inside.append(name)
            blocks.extend(child)
    return blocks


def shard_parameters(module: nn.Module, group: dist.ProcessGroup, device_type: str) -> int:
    """Shard ``module``'s parameters over ``group`` (its blocks one by one, then the rest); returns the
    bytes of parameters this rank now holds. Every rank of ``group`` must then call the module's
    forward the same number of times. A group of one rank leaves the module as it is."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if dist.get_world_size(group) > 1:
        mesh = DeviceMesh.from_group(group, device_type)
        for block in outer_blocks(module):
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return sum(_local(p).numel() * p.element_size() for p in module.parameters())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p
