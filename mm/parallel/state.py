"""Process groups of a run: megatron-core's (TP, PP, VPP, DP, CP) plus mm's CP sub-groups.

``initialize_parallel`` is called once, after the configuration was validated and the default
process group exists (``mm.accelerator.init_distributed``). Every rank creates every group in the
same order (torch.distributed.new_group is collective) and keeps the ones it belongs to. Every
group, megatron-core's and mm's, is created with the run's timeout (--distributed-timeout-minutes);
mm's are described as ``MM_<NAME>_GROUP`` (e.g. ``MM_ULYSSES_GROUP``), as megatron-core describes its
own, so a communication error or an NCCL watchdog report names the group.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from mm.accelerator.attention_kernels import available_kernels
from mm.parallel.groups import MM_GROUP_BUILDERS, ParallelSizes, RankGroups

_MM_GROUPS: dict[str, dist.ProcessGroup] = {}
_ATTENTION = {"algo": "ulysses_cp_algo", "overlap": False, "kernel": "auto"}
_MM_GROUP_RANKS: dict[str, list[int]] = {}
_SIZES: ParallelSizes | None = None


def initialize_parallel(
    sizes: ParallelSizes,
    virtual_pipeline_parallel: int | None = None,
    timeout_minutes: float = 30,
    seed: int | None = None,
    cp_algo: str = "ulysses_cp_algo",
    cp_overlap: bool = False,
    attention_kernel: str = "auto",
    dynamic_max_cp: int | None = None,
) -> None:
    """Create megatron-core's groups and mm's, then seed megatron's RNG tracker (if ``seed``).

    ``cp_algo`` / ``cp_overlap`` / ``attention_kernel`` are how self-attention runs under CP
    (--context-parallel-algo, --use-cp-send-recv-overlap, --attention-kernel). ``dynamic_max_cp``: dynamic
    DP/CP's ``max_cp_size`` (``mm.parallel.dynamic_cp``): the groups of every layout up to it, made now."""
    global _SIZES
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel needs the default process group (mm.accelerator.init_distributed)")
    if dist.get_world_size() != sizes.world_size:
        raise RuntimeError(f"world size is {dist.get_world_size()}, ParallelSizes says {sizes.world_size}")
    if mpu.model_parallel_is_initialized():
        raise RuntimeError("parallel state is already initialized; call destroy_parallel() first")
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_parallel,
        pipeline_model_parallel_size=sizes.pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=sizes.context_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    # megatron-core 0.19 creates a few groups without the timeout (EXPERT_DATA_PARALLEL_GROUP_GLOO, the
    # hybrid DP x CP groups); its update_pg_timeout gives every group it created the run's
    mpu.update_pg_timeout(timedelta(minutes=timeout_minutes))
    rank = dist.get_rank()
    for name, build in MM_GROUP_BUILDERS.items():
        _create_groups(name, build(sizes), rank, timedelta(minutes=timeout_minutes))
    if dynamic_max_cp is not None:
        from mm.parallel.dynamic_cp import create_strategies

        create_strategies(sizes, dynamic_max_cp, timedelta(minutes=timeout_minutes))
    _SIZES = sizes
    _ATTENTION.update(algo=cp_algo, overlap=cp_overlap, kernel=attention_kernel)
    available_kernels()  # found now, outside any compiled layer (attention_kernels.kernels_for)
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _create_groups(name: str, groups: RankGroups, rank: int, timeout: timedelta) -> None:
    for ranks in groups:
        group = dist.new_group(ranks, timeout=timeout, group_desc=f"MM_{name.upper()}_GROUP") if len(ranks) > 1 \
            else None
        if rank in ranks:
            _MM_GROUP_RANKS[name] = ranks
            if group is not None:
                _MM_GROUPS[name] = group


def destroy_parallel() -> None:
    global _SIZES
    from mm.parallel.dynamic_cp import destroy_strategies

    destroy_strategies()
    for group in _MM_GROUPS.values():
        dist.destroy_process_group(group)
    _MM_GROUPS.clear()
    _MM_GROUP_RANKS.clear()
    _SIZES = None
    mpu.destroy_model_parallel()
    # megatron-core's destroy leaves some module globals holding their groups (the intra-partial
    # data-parallel groups with CP, 0.19): a process forked later would inherit them, and replacing
    # one there runs the group's destructor, which joins threads the fork did not copy (a hang)
    for name, value in list(vars(mpu).items()):
        if name.isupper() and name.startswith("_") and isinstance(value, dist.ProcessGroup):
            setattr(mpu, name, None)


def get_parallel_sizes() -> ParallelSizes:
    if _SIZES is None:
        raise RuntimeError("parallel state is not initialized (mm.parallel.initialize_parallel)")
    return _SIZES


def get_group(name: str) -> dist.ProcessGroup | None:
    """mm's group ``name`` (see ``MM_GROUP_BUILDERS``) of this rank; None for a group of one."""
    if name not in MM_GROUP_BUILDERS:
        raise KeyError(f"no mm process group named {name!r}; known: {', '.join(MM_GROUP_BUILDERS)}")
    get_parallel_sizes()
    return _MM_GROUPS.get(name)


def get_group_ranks(name: str) -> list[int]:
    """Global ranks of this rank's group ``name``, in group order."""
    get_group(name)
    return _MM_GROUP_RANKS[name]


def get_encoder_dp_group() -> dist.ProcessGroup:
    """Ranks that encode the same batch redundantly unless encoder-DP shares the work: TP x CP."""
    return mpu.get_tensor_and_context_parallel_group()


def get_attention_options() -> dict:
    """{"algo", "overlap", "kernel"} of this run's self-attention."""
    get_parallel_sizes()
    return dict(_ATTENTION)
