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
Saving, atomicity and the tracker are those of ``checkpointing``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

HEADER = "checkpoint.json"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
MEGATRON_CHECKPOINT_VERSION = 3.0


def rank_dir(path: Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    """Megatron-LM's ``mp_rank_{tp:02d}`` (no PP) or ``mp_rank_{tp:02d}_{pp:03d}``."""
    return path / (f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")


def is_torch_checkpoint(path: Path) -> bool:
    return (path / HEADER).is_file()


def read_header(path: Path) -> dict[str, Any]:
    return json.loads((path / HEADER).read_text())


def write_header(path: Path, header: dict[str, Any]) -> None:
    """``checkpoint.json`` (rank 0; also what mm-convert writes beside its shards)."""
    with open(path / HEADER, "w") as f:
        json.dump(header, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _my_dir(path: Path) -> Path:
    return rank_dir(path, mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(),
                    mpu.get_pipeline_model_parallel_world_size())


def _dp_cp_group():
    return mpu.get_data_parallel_group(with_context_parallel=True)


def save(tmp: Path, header: dict[str, Any], chunk_keys: list[str], chunks: Sequence[torch.nn.Module], optimizer,
         scheduler, rng_state: dict | None, distributed_parts: list, ema: list | None = None) -> None:
    """Every rank: write this (TP, PP) rank's files into ``tmp`` (DP x CP rank 0 writes; the others
    contribute their RNG states and optimizer shards)."""
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
    out = _my_dir(tmp)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"checkpoint_version": MEGATRON_CHECKPOINT_VERSION, "iteration": header["iteration"],
                             "consumed_samples": header["consumed_samples"]}
    for key, chunk in zip(chunk_keys, chunks):
        state[key] = chunk.state_dict()
    if header["content"]["optimizer"]:
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


def read(path: Path, chunk_keys: list[str], chunks: Sequence[torch.nn.Module], *, strict: bool,
         read_param_state: bool) -> tuple[dict, list | None]:
    """This rank: read its (TP, PP) rank's file and load the model chunks from it (no collectives,
    so a rank that fails here can tell the others before anyone waits). Returns the file's dict and,
    on DP x CP rank 0 with ``read_param_state``, the distributed optimizer's parameter states."""
    mine = _my_dir(path)
    state = torch.load(mine / MODEL_FILE, map_location="cpu", weights_only=False)
    missing = [k for k in chunk_keys if k not in state]
    if missing:
        raise KeyError(f"{mine / MODEL_FILE} has no {', '.join(missing)} (holds {sorted(state)})")
    for key, chunk in zip(chunk_keys, chunks):
        loaded = dict(state[key])
        # megatron layers' _extra_state entries carry nothing for these layers; weights written by
        # mm-convert leave them out
        for name, value in chunk.state_dict().items():
            if name.endswith("._extra_state") and name not in loaded:
                loaded[name] = value
        chunk.load_state_dict(loaded, strict=strict)
    param_states = None
    if read_param_state and dist.get_rank(_dp_cp_group()) == 0:
        param_states = torch.load(mine / OPTIM_FILE, map_location="cpu", weights_only=False)
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
