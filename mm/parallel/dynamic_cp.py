"""Dynamic DP/CP (MindSpeed-MM's ``use_dynamic_dpcp``, ``max_cp_size``, ``max_seq_size``): the CP degree
chosen per iteration from the batches' sizes, over the run's data-parallel x context-parallel ranks.

The run's DP x CP ranks (``D`` of them) can be laid out as ``[D / c, c]`` (DP, CP) for every power of
two ``c`` up to ``max_cp_size``; the groups of each layout are made at start (``create_strategies``,
every rank in the same order; megatron-core's ``RankGenerator``, so CP ranks are consecutive as in the
static layout). Every rank reads its own micro-batches as the layout ``[D, 1]`` would. Each iteration
the largest micro-batch video (its element count, MindSpeed-MM's measure: the ``[b, c, t, h, w]``
video's, pixels with the encoders online, latents with a feature dataset) picks the smallest ``c`` with
``numel / c <= max_seq_size`` (``choose_cp``); then megatron-core's CP and DP groups (and mm's
Ulysses group) are those of ``[D / c, c]`` for the iteration (``use_strategy``), and every rank of a
CP group runs the micro-batches of all its members in turn, each spread over the ``c`` ranks
(``assignment``; ``exchange_batches`` broadcasts them). Each sample is still computed once, and the
gradients are averaged over all ``D`` ranks as in the static layout.

Only Ulysses CP attention (the CP group is the Ulysses group), as in MindSpeed-MM.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from mm.parallel import state
from mm.parallel.groups import ParallelSizes, RankGroups, megatron_groups

_STRATEGIES: dict[int, dict] = {}  # cp degree -> this rank's {"cp", "dp"} groups and ranks
_ACTIVE: dict = {"cp": None}


def cp_degrees(dpcp_size: int, max_cp_size: int) -> list[int]:
    """The CP degrees of the layouts: 1, 2, 4, ... up to ``max_cp_size`` (and ``dpcp_size``)."""
    top = min(max_cp_size, dpcp_size)
    return [1 << p for p in range(top.bit_length()) if (1 << p) <= top and dpcp_size % (1 << p) == 0]


def choose_cp(largest_numel: int, degrees: list[int], max_seq_size: int) -> int:
    """The smallest CP degree ``c`` with ``largest_numel / c <= max_seq_size``; the largest degree when
    none is small enough (MindSpeed-MM then keeps full DP and prints that max_seq_size is too small)."""
    for c in degrees:
        if largest_numel / c <= max_seq_size:
            return c
    return degrees[-1]


def strategy_groups(sizes: ParallelSizes, cp: int) -> dict[str, RankGroups]:
    """The CP and DP groups of the layout that spreads the run's DP x CP ranks as ``[DP x CP / cp, cp]``
    (TP and PP as they are)."""
    dpcp = sizes.data_parallel * sizes.context_parallel
    layout = ParallelSizes(world_size=sizes.world_size, tensor_parallel=sizes.tensor_parallel,
                           pipeline_parallel=sizes.pipeline_parallel, context_parallel=cp)
    assert layout.data_parallel * cp == dpcp
    return {"cp": megatron_groups(layout, "cp"), "dp": megatron_groups(layout, "dp")}


def assignment(dpcp_size: int, cp: int, num_micro: int) -> list[list[tuple[int, int]]]:
    """For each DP x CP index (TP = PP = 1: the rank) the micro-batches it runs at CP degree ``cp``, in
    order: ``(origin, micro)``, the ``micro``-th micro-batch that index ``origin`` read. The members of a
    CP group (``cp`` consecutive indices) run the same list: each member's micro-batches, member by member."""
    runs = []
    for index in range(dpcp_size):
        first = index - index % cp
        runs.append([(origin, micro) for origin in range(first, first + cp) for micro in range(num_micro)])
    return runs


def create_strategies(sizes: ParallelSizes, max_cp_size: int, timeout: timedelta) -> None:
    """Make the CP and DP groups of every layout (collective: every rank calls it, in the same order)."""
    rank = dist.get_rank()
    for cp in cp_degrees(sizes.data_parallel * sizes.context_parallel, max_cp_size):
        mine = {}
        for name, groups in strategy_groups(sizes, cp).items():
            for ranks in groups:
                group = dist.new_group(ranks, timeout=timeout, group_desc=f"MM_DYNAMIC_CP{cp}_{name.upper()}_GROUP")
                if rank in ranks:
                    mine[name] = (group, ranks)
        _STRATEGIES[cp] = mine


def destroy_strategies() -> None:
    for mine in _STRATEGIES.values():
        for group, _ in mine.values():
            dist.destroy_process_group(group)
    _STRATEGIES.clear()
    _ACTIVE["cp"] = None


def degrees() -> list[int]:
    """The CP degrees made at start (empty without dynamic DP/CP)."""
    return sorted(_STRATEGIES)


def active_cp() -> int | None:
    """The CP degree of the iteration running under ``use_strategy``; None outside one."""
    return _ACTIVE["cp"]


def context_parallel_size(static: int) -> int:
    """The CP degree the DiT splits its sequence over: the iteration's under dynamic DP/CP, else ``static``."""
    return _ACTIVE["cp"] or static


def cp_group_of_strategy(cp: int) -> tuple[dist.ProcessGroup, list[int]]:
    return _STRATEGIES[cp]["cp"]


# megatron-core's globals behind get_context_parallel_{group,world_size,rank} and get_data_parallel_*
# (without CP; 0.19 reads the "with GTP remat" one by default, the same group while GTP is off); the
# DP x CP group (DDP's gradient reduction) is the same in every layout
_DP_GROUPS = ("_DATA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP_WITH_GTP_REMAT")
_SWAPPED = ("_CONTEXT_PARALLEL_GROUP", "_CONTEXT_PARALLEL_GLOBAL_RANKS", *_DP_GROUPS, "_DATA_PARALLEL_GLOBAL_RANKS")


@contextlib.contextmanager
def use_strategy(cp: int):
    """megatron-core's CP and DP groups, and mm's Ulysses group, those of the layout ``[D / cp, cp]``
    inside the block; the static layout's again after it."""
    mine = _STRATEGIES[cp]
    saved = {name: getattr(mpu, name) for name in _SWAPPED if hasattr(mpu, name)}
    saved_mm = (state._MM_GROUPS.get("ulysses"), state._MM_GROUP_RANKS.get("ulysses"))
    (cp_group, cp_ranks), (dp_group, dp_ranks) = mine["cp"], mine["dp"]
    replace = {"_CONTEXT_PARALLEL_GROUP": cp_group, "_CONTEXT_PARALLEL_GLOBAL_RANKS": cp_ranks,
               "_DATA_PARALLEL_GLOBAL_RANKS": dp_ranks, **{name: dp_group for name in _DP_GROUPS}}
    for name, value in replace.items():
        if name in saved:
            setattr(mpu, name, value)
    _set_mm_group("ulysses", cp_group if cp > 1 else None, cp_ranks)
    _ACTIVE["cp"] = cp
    try:
        yield
    finally:
        _ACTIVE["cp"] = None
        for name, value in saved.items():
            setattr(mpu, name, value)
        _set_mm_group("ulysses", *saved_mm)


def _set_mm_group(name: str, group, ranks) -> None:
    if group is None:
        state._MM_GROUPS.pop(name, None)
    else:
        state._MM_GROUPS[name] = group
    if ranks is None:
        state._MM_GROUP_RANKS.pop(name, None)
    else:
        state._MM_GROUP_RANKS[name] = ranks


class _Meta:
    """A tensor's place in a broadcast structure."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = tuple(t.shape), t.dtype


def exchange_batches(own: list, group: dist.ProcessGroup | None, ranks: list[int], device) -> list[list]:
    """Every member's list of batches (nested dicts / lists of tensors and plain values), in member
    order, on every member of ``group`` (global ``ranks``): each member's list broadcast from it."""
    if group is None or len(ranks) == 1:
        return [own]
    me = dist.get_rank()
    everyone = []
    for src in ranks:
        layout = [tree_map(lambda x: _Meta(x) if isinstance(x, torch.Tensor) else x, own) if src == me else None]
        dist.broadcast_object_list(layout, src=src, group=group)
        leaves, spec = tree_flatten(own if src == me else layout[0])
        out = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                t = leaf.contiguous()
                dist.broadcast(t, src=src, group=group)
                out.append(leaf)
            elif isinstance(leaf, _Meta):
                t = torch.empty(leaf.shape, dtype=leaf.dtype, device=device)
                dist.broadcast(t, src=src, group=group)
                out.append(t)
            else:
                out.append(leaf)
        everyone.append(own if src == me else tree_unflatten(out, spec))
    return everyone


def largest_numel(numel: int, group: dist.ProcessGroup | None, device) -> int:
    """The largest ``numel`` over the ranks of ``group`` (the run's DP x CP ranks)."""
    t = torch.tensor([numel], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def describe(cp: int, dpcp_size: int) -> str:
    return f"cp={cp} (dp={dpcp_size // cp})"


__all__ = ["active_cp", "assignment", "choose_cp", "context_parallel_size", "cp_degrees", "create_strategies",
           "degrees", "describe", "destroy_strategies", "exchange_batches", "largest_numel", "strategy_groups",
           "use_strategy"]
