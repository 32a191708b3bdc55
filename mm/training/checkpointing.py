"""Saving and resuming training checkpoints: megatron-core's distributed format (``torch_dist``)
or, asked for, Megatron-LM's per-rank files (``checkpoint_torch``). The directory layout, the
header and the loading of the model weights are the checkpoint format's (``mm.ckpt``)::

    <dir>/latest_checkpointed_iteration.txt   the last complete iteration, e.g. "10"
    <dir>/iter_0000010/                       one torch.distributed.checkpoint directory

One checkpoint holds, under layout-independent keys (the model's global tensor names):

* ``model`` (``model0``, ``model1``, ... with virtual pipelining, one per chunk, as megatron names
  them): the chunks' ``sharded_state_dict()``. The tensors behind them carry global names
  (``blocks.{global layer}.…``, un-split TP shapes), so any TP/PP/VPP/CP/DP layout loads them.
* ``optimizer``: megatron-core's optimizer ``sharded_state_dict`` built on the model's. The plain
  optimizer writes its state per parameter in model space (reshards freely). The distributed
  optimizer writes ``fully_reshardable`` by default (gathered over DP x CP into model space at save:
  reshards over TP/PP/CP/DP; costs a host copy of the model-parallel shard's fp32 state on every DP
  rank while saving) or, asked for, ``dp_reshardable`` (each rank writes its own buckets, no gather;
  loads only into the same TP/PP/CP layout and bucket structure).
  megatron's ``fully_sharded_model_space`` is not offered: megatron-core 0.19 refuses the flattened
  ShardedTensors it builds.
* ``opt_param_scheduler``, and the header's entries (``mm.ckpt.CheckpointHeader``: version,
  iteration, consumed samples, the layout that wrote it (logged on load, checked against RNG
  states), what it holds, the predictor config and pipeline layers, ``extra``).
* ``rng_state``: per rank (python, numpy, torch, the accelerator's generator, megatron's
  tensor-parallel RNG tracker), one ``ShardedObject`` shard per (PP, TP, CP, DP) coordinate, so it
  only fits the layout that wrote it; ``load_rng=False`` (``--no-load-rng``) skips it.

Saving is atomic: every rank writes into ``<dir>/.iter_0000010.tmp``; after all ranks finished
(barrier) rank 0 records the manifest (``mm.ckpt.integrity``: every file's size, the metadata
files' checksums), renames the directory to ``iter_0000010`` and then replaces the tracker file
(temp file + ``os.replace``). A save that dies on the way leaves the previous checkpoint and
tracker as they were; its temp directory is removed by the next save. All ranks must see one
shared directory. With ``keep_last`` (``--keep-last-checkpoints``) rank 0 then deletes the older
checkpoints beyond the newest ones (``prune_checkpoints``).

Loading verifies the checkpoint first (``mm.ckpt.load.choose_checkpoint``); with ``fallback``
(``--load-fallback``) a damaged latest checkpoint gives way to the newest earlier one that verifies.

Synchronous saves only: megatron-core's asynchronous save needs its persistent writer process
(and NVRx) around the training loop; nothing here starts one, and no save starts any process
(``_in_process_write_results``). The same code runs on gloo (CPU) and NCCL. megatron-core's
torch_dist writer imports ``psutil``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import queue
import random
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from mm.accelerator import get_accelerator, rank0_print, wait_for_peers
from mm.ckpt import (
    CKPT_FORMATS,
    MODEL_PARALLEL,
    RELEASE,
    TRACKER,
    CheckpointError,
    CheckpointHeader,
    Content,
    ParallelLayout,
    checkpoint_dir,
    chunk_keys,
    failure_reason,
    list_checkpoints,
    unwrap,
    write_manifest,
    write_tracker,
)
from mm.ckpt.load import (
    Keep,
    agree,
    check_adapters,
    choose_checkpoint,
    load_model_state,
    load_sharded,
    model_sharded_state,
    open_checkpoint,
)
from mm.training import checkpoint_torch

OPTIMIZER_SHARDINGS = ("fully_reshardable", "dp_reshardable")
_TMP = re.compile(r"^\.iter_\d{7}\.(tmp|old|deleting)$")


class Resumed(tuple):
    """What ``load_checkpoint`` returns: the pair ``(iteration, consumed_samples)`` to resume from,
    and ``path``, the checkpoint directory it loaded (None when it loaded none)."""

    path: Path | None

    def __new__(cls, iteration: int, consumed_samples: int, path: Path | None = None) -> Resumed:
        resumed = super().__new__(cls, (iteration, consumed_samples))
        resumed.path = path
        return resumed

    def __reduce__(self):
        return Resumed, (self[0], self[1], self.path)


def _in_process_write_results() -> None:
    """A fresh in-process queue for megatron-core's torch_dist writer to hand its write results
    back through. Without one it creates, at the first save, a ``multiprocessing`` Manager queue:
    a server process spawned from the trainer (a second interpreter that imports the training
    script's modules, ~680 MB) and a resource-tracker process, neither of which dies when the
    trainer is killed. A synchronous save writes in this process, so a plain queue is all it needs."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def _distributed_parts(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [p for p in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(p, DistributedOptimizer)]


def _is_distributed_optimizer(optimizer) -> bool:
    distributed = _distributed_parts(optimizer)
    if distributed and len(distributed) != len(getattr(optimizer, "chained_optimizers", [optimizer])):
        raise CheckpointError("the optimizer chains distributed and plain megatron optimizers; not supported here")
    return bool(distributed)


def _allocate_optimizer_state(optimizer) -> None:
    """Give a distributed optimizer that never stepped its Adam state, which it must have before it
    can describe (and so load) its checkpoint: megatron's zero-gradient step. The values it leaves
    (including weight decay applied to the fp32 main weights) are all overwritten by the load."""
    for part in _distributed_parts(optimizer):
        if len(part.optimizer.state) == 0:
            part._init_optimizer_states_with_dummy_values()


def _load_param_state(part, loader, param_state) -> None:
    """``loader(param_state)`` (one of the distributed optimizer's parameter-state loaders) for
    megatron-core 0.19's distributed optimizer over torch's Adam (no TE/apex), around two faults
    of that combination: its loaders copy every tensor of a parameter's Adam state, ``step``
    included, from checkpoint entries that never carry ``step`` (a KeyError); and its
    ``load_state_dict`` gives every parameter one shared ``step`` tensor, which torch's Adam would
    then advance once per parameter and step. So ``step`` is out of the way while the parameter
    state loads, and each parameter gets its own copy back."""
    steps = {p: s.pop("step") for p, s in part.optimizer.state.items() if "step" in s}
    with torch.no_grad():  # fp32 models' main weights are views of the parameters (leaves needing grad)
        loader(param_state)
    for p, step in steps.items():
        part.optimizer.state[p]["step"] = step.clone()


def _load_distributed_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` of a torch_dist checkpoint's distributed-optimizer state: the
    param groups (with the step) first, then the parameter state in the format it was saved in."""
    parts = _distributed_parts(optimizer)
    states = [state] if len(parts) == 1 else [state[i] for i in sorted(state)]
    for part, part_state in zip(parts, states):
        part_state = dict(part_state)
        param_state = part_state.pop("param_state")
        loader = {"fully_reshardable": part.load_parameter_state_from_fully_reshardable,
                  "dp_reshardable": part.load_parameter_state_from_dp_reshardable}[
                      part_state.pop("param_state_sharding_type")]
        part.load_state_dict(part_state)  # param groups, step, grad scaler
        _load_param_state(part, loader, param_state)


def _rng_coordinates() -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = (mpu.get_pipeline_model_parallel_world_size(), mpu.get_tensor_model_parallel_world_size(),
             mpu.get_context_parallel_world_size(), mpu.get_data_parallel_world_size())
    offset = (mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank(),
              mpu.get_context_parallel_rank(), mpu.get_data_parallel_rank())
    return shape, offset


def _rng_state() -> dict[str, Any]:
    acc = get_accelerator()
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            # on the CPU the torch generator above is the device's
            "device": None if acc.is_cpu else acc.module.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict[str, Any]) -> None:
    acc = get_accelerator()
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["device"] is not None and not acc.is_cpu:
        acc.module.set_rng_state(state["device"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state_dict(model_chunks, optimizer, with_optim: bool, with_rng: bool, optimizer_sharding: str,
                        is_loading: bool, keep: Keep | None = None) -> dict[str, Any]:
    """What a checkpoint holds (sharded parts; the caller adds the common values when saving);
    ``keep``: the model tensors it holds (a LoRA run's adapters), by state-dict name."""
    state: dict[str, Any] = model_sharded_state(model_chunks, keep)
    if with_optim:
        metadata = {"distrib_optim_sharding_type": optimizer_sharding, "chained_optim_avoid_prefix": True}
        model_state = {k: state[k] for k in chunk_keys(len(model_chunks))}
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    if with_rng:
        shape, offset = _rng_coordinates()
        state["rng_state"] = ShardedObject("rng_state", _rng_state() if not is_loading else None, shape, offset,
                                           replica_id=0)
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(root: Path) -> None:
    for entry in root.iterdir():
        if _TMP.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry)


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)  # what a save that died left behind
    tmp.mkdir()


def _on_rank0(failure: str, fn, *args) -> None:
    """Run a file-system step on rank 0; every rank raises if it failed (instead of waiting for it)."""
    error = None
    if dist.get_rank() == 0:
        try:
            fn(*args)
        except OSError as e:
            error = f"{failure}: {e}"
    # removing what a failed save left can take long on a slow file system: wait outside any collective
    wait_for_peers("rank 0's checkpoint file-system step")
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise CheckpointError(message[0])


def _publish(root: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rank 0, after every rank wrote ``tmp``: record its manifest, rename it into place, then point
    the tracker at it."""
    write_manifest(tmp)
    if final.exists():  # a second save of the same iteration replaces the first
        old = root / f".{final.name}.old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    write_tracker(root, iteration)
    _fsync_dir(root)


def prune_checkpoints(root: Path, keep: int, saved: Path, protect: Path | None = None) -> list[Path]:
    """Rank 0, after the tracker names ``saved``: delete the ``iter_*`` checkpoints of ``root`` older
    than ``saved`` beyond the newest ``keep`` (``saved`` counted), never ``saved`` itself nor
    ``protect`` (the checkpoint this run loaded). Checkpoints newer than ``saved`` (of an earlier
    run that went further) and ``release`` are left alone. Each is first renamed to
    ``.iter_*.deleting`` (which no loader reads and the next save removes), so a crash part-way
    leaves no half-deleted checkpoint under its own name. Returns the directories deleted; a
    failure is reported on rank 0 and leaves the rest (training goes on)."""
    newest = _iteration_of(saved)
    older = [path for iteration, path in list_checkpoints(root) if iteration <= newest]
    spared = {p.resolve() for p in older[:keep] + [saved] + ([protect] if protect is not None else [])}
    deleted = []
    for path in older:
        if path.resolve() in spared:
            continue
        doomed = root / f".{path.name}.deleting"
        try:
            path.rename(doomed)
            _fsync_dir(root)
            shutil.rmtree(doomed)
        except OSError as e:
            print(f"WARNING: --keep-last-checkpoints {keep}: cannot delete {path}: {e}; it stays", flush=True)
            continue
        deleted.append(path)
    return deleted


def _iteration_of(path: Path) -> int:
    return int(path.name[len("iter_"):])


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, model_chunks: Sequence[torch.nn.Module],
                    optimizer, scheduler, consumed_samples: int, *, save_optim: bool = True, save_rng: bool = True,
                    entry_point: str | None = None, predictor: dict[str, Any] | None = None,
                    pipeline_layers: list | None = None, extra: dict[str, Any] | None = None,
                    optimizer_sharding: str = "fully_reshardable", ckpt_format: str = "torch_dist",
                    ema=None, keep_last: int | None = None, protect: Path | None = None,
                    keep: Keep | None = None, lora: dict[str, Any] | None = None) -> Path:
    """Write ``<save_dir>/iter_{iteration:07d}`` and point the tracker at it; every rank calls this.

    ``model_chunks``: this rank's model chunks (megatron DDP-wrapped or bare), one per virtual
    pipeline chunk in order; ``optimizer`` / ``scheduler``: megatron-core's optimizer and
    ``OptimizerParamScheduler`` (both skipped with ``save_optim=False``; the optimizer may be None
    then); ``consumed_samples``: global samples consumed by the end of ``iteration``;
    ``entry_point``, ``predictor`` (the predictor config's keys), ``pipeline_layers`` and
    ``extra`` (a JSON-able dict): what the header records (``mm.ckpt.CheckpointHeader``);
    ``optimizer_sharding``: the
    distributed optimizer's torch_dist format (see the module docstring); ``ckpt_format``:
    ``torch_dist`` (any layout loads it) or ``torch`` (megatron's per-rank files, see
    ``checkpoint_torch``); ``ema``: a ``ModelEMA`` whose averages the checkpoint keeps too;
    ``keep_last``: once the tracker names this checkpoint, rank 0 deletes older ones beyond the
    newest ``keep_last`` (``prune_checkpoints``; None keeps all), never ``protect`` (the checkpoint
    this run loaded); ``keep``: the model tensors to save, by state-dict name (None: all), and ``lora``
    the header's record of them (a LoRA run: its adapters alone, ``LoraSettings.to_dict``). Returns the
    checkpoint directory.
    """
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer_sharding = {optimizer_sharding!r}; valid: {', '.join(OPTIMIZER_SHARDINGS)}")
    if ckpt_format not in CKPT_FORMATS:
        raise ValueError(f"ckpt_format = {ckpt_format!r}; valid: {', '.join(CKPT_FORMATS)}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last = {keep_last}; valid: an integer >= 1, or None to keep every checkpoint")
    if ckpt_format == "torch_dist" and importlib.util.find_spec("psutil") is None:
        raise CheckpointError("--save: megatron-core's torch_dist writer needs the psutil package (pip install psutil)")
    root = Path(save_dir)
    final, tmp = checkpoint_dir(root, iteration), root / f".iter_{iteration:07d}.tmp"
    _on_rank0(f"--save {root}: cannot prepare {tmp}", _prepare, root, tmp)
    rank0_print(f"saving checkpoint at iteration {iteration:7d} to {root} ({ckpt_format})")
    distributed_optimizer = save_optim and _is_distributed_optimizer(optimizer)
    sharding = (("dp_zero" if ckpt_format == "torch" else optimizer_sharding) if distributed_optimizer else None)
    header = CheckpointHeader(
        iteration=iteration, consumed_samples=consumed_samples,
        parallel=dataclasses.replace(ParallelLayout.current(), distributed_optimizer=distributed_optimizer,
                                     optimizer_sharding=sharding),
        content=Content(optimizer=save_optim, rng=save_rng, ema=ema is not None), entry_point=entry_point,
        predictor=predictor, pipeline_layers=pipeline_layers, lora=lora, extra=dict(extra or {}), format=ckpt_format)
    failure = f"--save {root}: writing iteration {iteration} to {tmp} failed; {TRACKER} still names the previous " \
              "checkpoint"
    if ckpt_format == "torch":
        error = None
        try:
            checkpoint_torch.save(tmp, header, chunk_keys(len(model_chunks)), [unwrap(c) for c in model_chunks],
                                  optimizer, scheduler, _rng_state() if save_rng else None,
                                  _distributed_parts(optimizer) if distributed_optimizer else [],
                                  ema=None if ema is None else ema.state_dict(), keep=keep)
        except OSError as e:
            error = f"{failure}: {e}"
        agree(error)
    else:
        state = _sharded_state_dict(model_chunks, optimizer, save_optim, save_rng, optimizer_sharding,
                                    is_loading=False, keep=keep)
        if save_optim:
            state["opt_param_scheduler"] = scheduler.state_dict()
        if ema is not None:
            state["ema"] = ema.sharded_state_dict(chunk_keys(len(model_chunks)))
        state.update(header.to_dict())
        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                                    mpu.get_data_parallel_group(with_context_parallel=True))
        _in_process_write_results()
        try:
            dist_checkpointing.save(state, str(tmp), strategy)
        except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
            raise CheckpointError(f"{failure}: {failure_reason(e)}") from e
    dist.barrier()  # every rank's shards are on disk
    _on_rank0(f"--save {root}: iteration {iteration} was written to {tmp} but could not be put in place",
              _publish, root, tmp, final, iteration)
    rank0_print(f"  saved checkpoint at iteration {iteration:7d} to {final}")
    if keep_last is not None and dist.get_rank() == 0:
        for path in prune_checkpoints(root, keep_last, final, protect):
            print(f"  deleted {path} (--keep-last-checkpoints {keep_last})", flush=True)
    return final


def check_load_dir(args) -> None:
    """--load names a checkpoint directory; only a resumable run (--load = --save) may find none yet
    (its first launch starts from scratch). Any other --load without a checkpoint is a wrong path,
    which would otherwise train from random weights: a ConfigError before anything starts."""
    from mm.arguments import ConfigError

    if args.load is None:
        return
    load = Path(args.load)
    if (load / TRACKER).is_file() or (args.save is not None and Path(args.save).resolve() == load.resolve()):
        return
    if list_checkpoints(load):  # checkpoints without a tracker: the load says what to do about them
        return
    where = str(load) if load.is_absolute() else f"{load} from {Path.cwd()}"
    raise ConfigError(f"--load {args.load}: no checkpoint there (no {TRACKER} in {where}); give mm-convert's output "
                      "or a training run's --save directory, the same directory as --save to start a resumable run, "
                      "or leave --load out to train from scratch")


def load_checkpoint(load_dir: str | os.PathLike, model_chunks: Sequence[torch.nn.Module], optimizer, scheduler, *,
                    load_optim: bool = True, load_rng: bool = True, finetune: bool = False,
                    strict: bool = True, ema=None, fallback: bool = False, flag: str = "--load",
                    keep: Keep | None = None, adapters: dict[str, Any] | None = None) -> Resumed:
    """Load the checkpoint the tracker in ``load_dir`` names into this run's model chunks (and,
    unless ``finetune`` or ``load_optim=False``, optimizer and scheduler; unless ``finetune`` or
    ``load_rng=False``, RNG states). Either format (torch_dist or torch) is recognised from the
    directory. Returns ``(iteration, consumed_samples)`` to resume from; ``(0, 0)`` with
    ``finetune``, for a ``release`` checkpoint (converted weights), or when ``load_dir`` has no
    tracker file (a first launch: training starts from scratch). ``strict``: every model tensor
    must be in the checkpoint and every model tensor of the checkpoint must be loaded by some rank.
    ``ema``: this run's ``ModelEMA``; it resumes from the checkpoint's averages when there are any
    (not with ``finetune``), else starts from the loaded weights. The checkpoint is verified
    before anything is read (``mm.ckpt.integrity``); a damaged one is a DamagedCheckpointError
    naming the directory and the file, or with ``fallback`` (``--load-fallback``) gives way to the
    newest earlier checkpoint that verifies (rank 0 says which and why). The result's ``path`` is
    the directory loaded. ``keep``: the model tensors the checkpoint holds, by state-dict name, and
    ``adapters`` this run's LoRA adapters when it is a LoRA run's (``--lora-load``, named ``flag``). Every
    rank calls this.
    """
    root = Path(load_dir)
    path = choose_checkpoint(root, flag, fallback, "--load-fallback")
    if path is None:
        rank0_print(f"no checkpoint to load: {flag} {root} has no {TRACKER}; training starts from scratch")
        return Resumed(0, 0)
    header = open_checkpoint(path, flag)
    check_adapters(header, path, flag, adapters)
    with_optim = load_optim and not finetune
    with_rng = load_rng and not finetune
    _check_resumable(header, path, optimizer, with_optim=with_optim, with_rng=with_rng, flag=flag)
    with_ema = ema is not None and not finetune and header.content.ema
    if with_optim:
        _allocate_optimizer_state(optimizer)
    load = _load_torch if header.format == "torch" else _load_torch_dist
    load(path, model_chunks, optimizer, scheduler, header, with_optim=with_optim, with_rng=with_rng, strict=strict,
         ema=ema if with_ema else None, keep=keep, flag=flag)
    if ema is not None and not with_ema:
        ema.reset()
        rank0_print(f"  EMA starts from the loaded weights ({'--finetune' if finetune else 'no EMA in the checkpoint'})")
    dist.barrier()
    if finetune or path == checkpoint_dir(root, RELEASE):
        rank0_print(f"  loaded model weights from {path} ({'--finetune' if finetune else 'release'}: iteration and "
                    "consumed samples start at 0)")
        return Resumed(0, 0, path)
    rank0_print(f"  loaded checkpoint from {path} at iteration {header.iteration}")
    return Resumed(header.iteration, header.consumed_samples, path)


def _check_resumable(header: CheckpointHeader, path: Path, optimizer, *, with_optim: bool, with_rng: bool,
                     flag: str = "--load") -> None:
    """The optimizer and RNG states asked for are in the checkpoint and fit this run."""
    saved, layout, root = header.parallel, ParallelLayout.current(), path.parent
    if with_optim:
        if not header.content.optimizer:
            raise CheckpointError(f"{flag} {root}: {path} holds no optimizer state (saved with --no-save-optim or "
                                  "converted weights); load with --no-load-optim or --finetune")
        if saved.distributed_optimizer != _is_distributed_optimizer(optimizer):
            raise CheckpointError(
                f"{flag} {root}: {path} holds {'distributed' if saved.distributed_optimizer else 'plain'} optimizer "
                f"state; this run uses the {'plain' if saved.distributed_optimizer else 'distributed'} optimizer "
                "(--use-distributed-optimizer must match, or load with --no-load-optim)")
        if saved.optimizer_sharding == "dp_reshardable" and not saved.matches(
                layout, MODEL_PARALLEL + ("context_parallel_size",)):
            raise CheckpointError(f"{flag} {root}: {path} holds dp_reshardable optimizer state written by "
                                  f"{saved.describe()}; it loads only into the same TP/PP/VPP/CP layout (this run: "
                                  f"{layout.describe()}); load with --no-load-optim")
    if with_rng:
        if not header.content.rng:
            raise CheckpointError(f"{flag} {root}: {path} holds no RNG state (saved with --no-save-rng or converted "
                                  "weights); load with --no-load-rng")
        if not saved.matches(layout, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                      "context_parallel_size", "data_parallel_size")):
            raise CheckpointError(f"{flag} {root}: {path} holds per-rank RNG states of {saved.describe()}; this run "
                                  f"is {layout.describe()}; load with --no-load-rng to keep this run's RNG states")


def _load_torch(path: Path, model_chunks, optimizer, scheduler, header: CheckpointHeader, *, with_optim: bool,
                with_rng: bool, strict: bool, ema=None, keep: Keep | None = None,
                flag: str = "--load") -> None:
    distributed = _distributed_parts(optimizer) if with_optim else []
    error = None
    try:
        state, param_states = checkpoint_torch.read(path, model_chunks, strict=strict,
                                                    read_param_state=bool(distributed), keep=keep)
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except CheckpointError as e:
        error = e
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        error = f"{flag} {path.parent}: cannot load {path}: {type(e).__name__}: {e}"
    agree(error)
    checkpoint_torch.restore(state, param_states, optimizer, scheduler, with_optim=with_optim, with_rng=with_rng,
                             distributed_parts=distributed,
                             load_param_state=lambda part, st: _load_param_state(
                                 part, part.load_parameter_state_from_dp_zero, st),
                             set_rng=_set_rng_state)


def _load_torch_dist(path: Path, model_chunks, optimizer, scheduler, header: CheckpointHeader, *, with_optim: bool,
                     with_rng: bool, strict: bool, ema=None, keep: Keep | None = None,
                     flag: str = "--load") -> None:
    keys = chunk_keys(len(model_chunks))
    state = _sharded_state_dict(model_chunks, optimizer, with_optim, with_rng,
                                header.parallel.optimizer_sharding or "fully_reshardable", is_loading=True, keep=keep)
    if ema is not None:
        state["ema"] = ema.sharded_state_dict(keys)
    loaded = load_sharded(path, state, keys, strict, flag=flag)
    load_model_state(model_chunks, loaded, strict, keep)
    if with_optim:
        if header.parallel.distributed_optimizer:
            _load_distributed_optimizer(optimizer, loaded["optimizer"])
        else:
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 main copies from the loaded weights
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    if ema is not None:
        ema.load_sharded(loaded["ema"], keys)
