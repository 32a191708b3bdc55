"""``--ckpt-format torch``: Megatron-LM's per-rank checkpoint files, the format of MindSpeed-MM's
scripts and of the weights ``mm-convert`` writes.

Layout (Megatron-LM's names)::

    <dir>/latest_checkpointed_iteration.txt      "10", or "release" for converted weights
    <dir>/iter_0000010/checkpoint.json           mm's header: version, iteration, consumed samples,
                                                 the layout that wrote it, what it holds
    <dir>/iter_0000010/mp_rank_00/               one directory per (TP, PP) rank:
                                                 mp_rank_{tp:02d} without PP, mp_rank_{tp:02d}_{pp:03d} with
        model_optim_rng.pt                       model (model0, model1, ... with VPP), optimizer,
                                                 opt_param_scheduler, rng_state (one per DP x CP rank),
                                                 iteration, checkpoint_version 3.0; ema (one
                                                 {name: fp32 tensor} per chunk) with --ema-decay
        distrib_optim.pt                         the distributed optimizer's parameter state
                                                 (fp32 main weights and Adam moments), gathered over DP x CP

Each model-parallel rank keeps its own shard under its local parameter names, so a checkpoint
loads only into the TP/PP/VPP layout that wrote it (``mm-convert resplit`` converts between
layouts; ``--ckpt-format torch_dist`` loads anywhere). DP and CP may change when the optimizer
is distributed (megatron's DP-rank-0 format is unpadded); RNG states need the same DP x CP size.
Saving, atomicity and the tracker are those of ``checkpointing``; the layout, the header and the
model part of loading are ``mm.ckpt``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from mm.ckpt import MEGATRON_CHECKPOINT_VERSION, MODEL_FILE, OPTIM_FILE, CheckpointHeader, write_header
from mm.ckpt.integrity import load_torch_file
from mm.ckpt.load import my_rank_dir, read_model_file


def _dp_cp_group():
    return mpu.get_data_parallel_group(with_context_parallel=True)


def save(tmp: Path, header: CheckpointHeader, chunk_keys: list[str], chunks: Sequence[torch.nn.Module], optimizer,
         scheduler, rng_state: dict | None, distributed_parts: list, ema: list | None = None,
         keep: Callable[[str], bool] | None = None) -> None:
    """Every rank: write this (TP, PP) rank's files into ``tmp`` (DP x CP rank 0 writes; the others
    contribute their RNG states and optimizer shards); ``keep``: the model tensors to write, by name."""
    group = _dp_cp_group()
    writer = dist.get_rank(group) == 0
    rng_states = None
    if rng_state is not None:
        rng_states = [None] * dist.get_world_size(group)
        dist.all_gather_object(rng_states, rng_state, group=group)
    # the distributed optimizer's shards gathered on DP x CP rank 0 (a collective on every rank)
    param_states = [part.get_parameter_state_dp_zero() for part in distributed_parts]
    if dist.get_rank() == 0:
        write_header(tmp, header)
    if not writer:
        return
    out = my_rank_dir(tmp)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"checkpoint_version": MEGATRON_CHECKPOINT_VERSION, "iteration": header.iteration,
                             "consumed_samples": header.consumed_samples}
    for key, chunk in zip(chunk_keys, chunks):
        state[key] = {name: value for name, value in chunk.state_dict().items() if keep is None or keep(name)}
    if header.content.optimizer:
        state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng_states is not None:
        state["rng_state"] = rng_states
    if ema is not None:
        state["ema"] = ema
    _save_file(state, out / MODEL_FILE)
    if distributed_parts:
        _save_file(param_states, out / OPTIM_FILE)


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read(path: Path, chunks: Sequence[torch.nn.Module], *, strict: bool,
         read_param_state: bool, keep: Callable[[str], bool] | None = None) -> tuple[dict, list | None]:
    """This rank: read its (TP, PP) rank's file and load the model chunks from it (``mm.ckpt``'s
    model part; no collectives). Returns the file's dict and, on DP x CP rank 0 with
    ``read_param_state``, the distributed optimizer's parameter states."""
    state = read_model_file(path, chunks, strict, keep=keep)
    param_states = None
    if read_param_state and dist.get_rank(_dp_cp_group()) == 0:
        param_states = load_torch_file(my_rank_dir(path) / OPTIM_FILE, f"--load {path.parent}", weights_only=False)
    return state, param_states


def restore(state: dict, param_states: list | None, optimizer, scheduler, *, with_optim: bool, with_rng: bool,
            distributed_parts: list, load_param_state: Callable[[Any, Any], None],
            set_rng: Callable[[dict], None]) -> None:
    """Every rank: optimizer (the distributed one's parameter state scattered from DP x CP rank 0),
    scheduler and RNG from what ``read`` returned."""
    if with_optim:
        optimizer.load_state_dict(state["optimizer"])
        for i, part in enumerate(distributed_parts):
            load_param_state(part, None if param_states is None else param_states[i])
        scheduler.load_state_dict(state["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 main copies from the loaded weights
    if with_rng:
        set_rng(state["rng_state"][dist.get_rank(_dp_cp_group())])
