"""Rank layouts of every process group, as pure functions of the parallel sizes.

megatron-core's ``RankGenerator`` decides the TP, CP, DP and PP groups (order ``tp-cp-ep-dp-pp``:
TP ranks are contiguous, CP ranks are strided by TP, ...). mm adds groups inside each CP group:

* hybrid (USP) context parallelism splits a CP group of size ``cp`` into ``cp / U`` Ulysses groups
  of ``U = ulysses_degree`` consecutive CP ranks (kept inside a node, where the all-to-all is cheap)
  and ``U`` ring groups of CP ranks strided by ``U``. Phantom's 8 GPUs, ulysses 4 x ring 2:
  ulysses {0,1,2,3},{4,5,6,7}; rings {0,4},{1,5},{2,6},{3,7}.
* double-ring attention (``cp_window_size = W > 1``) splits every ring into inner windows of ``W``
  consecutive ring members and outer rings that join the members at the same window position.
* VAE-CP groups are ``vae_cp_size`` consecutive ranks of a TP x CP group (ranks that hold the same
  sample, so they can share the work of encoding it).
* CFG pairs (inference) are two consecutive ranks of a DP group: the conditional and the
  unconditional branch of classifier-free guidance of the same sample.
* the first-stage group is every rank of pipeline stage 0 (its TP x CP x DP ranks; with PP = 1 the
  whole world): the ranks that hold the frozen encoders in training and call them the same number
  of times, over which ``text_encoder_fsdp`` shards the text encoders. A rank of a later stage is
  in a group of its own (no process group is made for it).

Nothing here touches torch.distributed; ``mm.parallel.state`` builds the groups from these lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.parallel_state import RankGenerator

RankGroups = list[list[int]]

MEGATRON_ORDER = "tp-cp-ep-dp-pp"


@dataclass(frozen=True)
class ParallelSizes:
    """Parallel degrees of one run; ``data_parallel`` is derived from the world size."""

    world_size: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    ulysses_degree: int = 1  # Ulysses part of CP; CP / ulysses_degree is the ring part
    cp_window_size: int = 1
    vae_cp_size: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)

    @property
    def ring_degree(self) -> int:
        return self.context_parallel // self.ulysses_degree


def megatron_groups(sizes: ParallelSizes, name: str) -> RankGroups:
    """Groups megatron-core makes for ``name`` (e.g. "tp", "cp", "dp", "pp", "tp-cp", "dp-cp")."""
    generator = RankGenerator(
        tp=sizes.tensor_parallel,
        ep=1,
        dp=sizes.data_parallel,
        pp=sizes.pipeline_parallel,
        cp=sizes.context_parallel,
        order=MEGATRON_ORDER,
    )
    return generator.get_ranks(name)


def _split_contiguous(group: list[int], size: int) -> RankGroups:
    return [group[i : i + size] for i in range(0, len(group), size)]


def _split_strided(group: list[int], stride: int) -> RankGroups:
    return [group[i::stride] for i in range(stride)]


def ulysses_groups(sizes: ParallelSizes) -> RankGroups:
    """Consecutive CP ranks that exchange heads by all-to-all."""
    return [g for cp in megatron_groups(sizes, "cp") for g in _split_contiguous(cp, sizes.ulysses_degree)]


def ring_groups(sizes: ParallelSizes) -> RankGroups:
    """CP ranks that pass K/V around a ring (the whole CP group when there is no Ulysses part)."""
    return [g for cp in megatron_groups(sizes, "cp") for g in _split_strided(cp, sizes.ulysses_degree)]


def inner_window_groups(sizes: ParallelSizes) -> RankGroups:
    """Double ring: ``cp_window_size`` consecutive members of each ring."""
    return [g for ring in ring_groups(sizes) for g in _split_contiguous(ring, sizes.cp_window_size)]


def outer_window_groups(sizes: ParallelSizes) -> RankGroups:
    """Double ring: ring members at the same position of every window."""
    return [g for ring in ring_groups(sizes) for g in _split_strided(ring, sizes.cp_window_size)]


def vae_cp_groups(sizes: ParallelSizes) -> RankGroups:
    """``vae_cp_size`` consecutive ranks of a TP x CP group."""
    return [g for tpcp in megatron_groups(sizes, "tp-cp") for g in _split_contiguous(tpcp, sizes.vae_cp_size)]


def cfg_groups(sizes: ParallelSizes) -> RankGroups:
    """Classifier-free-guidance pairs (inference's --cfg-parallel): two consecutive ranks of a DP group,
    which hold the same TP/CP/PP coordinates; one runs the conditional branch, the other the
    unconditional. An odd DP size leaves every rank on its own."""
    return [g for dp in megatron_groups(sizes, "dp")
            for g in (_split_contiguous(dp, 2) if len(dp) % 2 == 0 else [[r] for r in dp])]


def first_stage_groups(sizes: ParallelSizes) -> RankGroups:
    """The ranks of pipeline stage 0 (TP x CP x DP, in megatron's order), then every rank of a later
    stage on its own."""
    stage0 = next(g for g in megatron_groups(sizes, "tp-cp-dp") if 0 in g)
    return [stage0] + [[r] for r in range(sizes.world_size) if r not in stage0]


MM_GROUP_BUILDERS = {
    "ulysses": ulysses_groups,
    "ring": ring_groups,
    "cp_inner_window": inner_window_groups,
    "cp_outer_window": outer_window_groups,
    "vae_cp": vae_cp_groups,
    "cfg": cfg_groups,
    "first_stage": first_stage_groups,
}


def all_layouts(sizes: ParallelSizes) -> dict[str, RankGroups]:
    """Every group of a run by name: megatron's and mm's (used by ``describe_layout`` and tests)."""
    layouts = {name: megatron_groups(sizes, key) for name, key in
               (("tp", "tp"), ("pp", "pp"), ("cp", "cp"), ("dp", "dp"), ("dp_cp", "dp-cp"), ("tp_cp", "tp-cp"))}
    layouts.update({name: build(sizes) for name, build in MM_GROUP_BUILDERS.items()})
    return layouts


def group_of(groups: RankGroups, rank: int) -> list[int]:
    """The group in ``groups`` that holds ``rank``."""
    for group in groups:
        if rank in group:
            return group
    raise ValueError(f"rank {rank} is in none of {groups}")


def describe_layout(sizes: ParallelSizes, rank: int) -> str:
    """One line per group kind with the ranks ``rank`` shares it with (for start-up logs)."""
    return "\n".join(f"  {name:<16} {group_of(groups, rank)}" for name, groups in all_layouts(sizes).items())
