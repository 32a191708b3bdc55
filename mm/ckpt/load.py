"""Model weights from an mm checkpoint (either format) into this rank's model chunks: what
inference loads, and the model part of the training loop's ``load_checkpoint`` (which adds the
optimizer, scheduler, RNG and EMA around the same steps).

- torch_dist: each chunk's ``sharded_state_dict()`` (global names, un-split shapes) checked
  against the checkpoint's metadata on every rank, then megatron-core's fully parallel load; any
  TP/PP/VPP/CP/DP layout reads any checkpoint.
- torch: this rank's ``mp_rank_XX[_YYY]/model_optim_rng.pt`` (local names); only the TP/PP/VPP
  layout that wrote it reads it.

Which checkpoint: the one the tracker names, verified first on rank 0 (``integrity.py``: the
manifest, the format's own file list, the header) and the verdict broadcast, so every rank loads
the same checkpoint or raises the same error; a damaged one is a DamagedCheckpointError naming
the directory and the file, or, asked for (``--load-fallback``), the newest earlier checkpoint
that verifies instead.

Every rank calls these; a rank that fails tells the others instead of leaving them waiting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as mpu
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy, load_sharded_metadata
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
from torch.distributed.checkpoint.api import CheckpointException

from mm.accelerator import rank0_print
from mm.ckpt.chunks import chunk_keys, unwrap
from mm.ckpt.header import MODEL_PARALLEL, CheckpointHeader, ParallelLayout, read_header
from mm.ckpt.integrity import load_torch_file, verify_checkpoint
from mm.ckpt.layout import (
    DIST_INDEX,
    MODEL_FILE,
    RELEASE,
    TRACKER,
    CheckpointError,
    DamagedCheckpointError,
    failure_reason,
    find_checkpoint,
    list_checkpoints,
    rank_dir,
    read_tracker,
)

# which of a model's tensors a checkpoint holds, by state-dict name (a LoRA run's: its adapters)
Keep = Callable[[str], bool]
# checkpoint keys outside the model (optimizer state, RNG, EMA, megatron's common entries)
_NOT_MODEL = ("optimizer.", "rng_state", "common_state", "ema.")


def agree(error: str | CheckpointError | None) -> None:
    """Every rank raises the first rank's error if any rank has one (instead of the others waiting);
    a DamagedCheckpointError stays one."""
    mine = None if error is None else (isinstance(error, DamagedCheckpointError), str(error))
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, mine)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        damaged, message = first
        raise (DamagedCheckpointError if damaged else CheckpointError)(message)


def _tracked_iteration(root: Path) -> int | None:
    try:
        return read_tracker(root)
    except DamagedCheckpointError:
        return None


def select_checkpoint(root: str | os.PathLike, flag: str = "--load", fallback: bool = False,
                      fallback_flag: str = "--load-fallback") -> tuple[Path | None, str | None]:
    """The checkpoint directory of ``root`` to load, verified (``verify_checkpoint``), and a note
    saying why it is not the one the tracker names (None when it is); ``(None, None)`` when
    ``root`` holds no checkpoint (no tracker and no ``iter_*`` directory: a first launch).

    The tracker's checkpoint when it verifies. When it does not, or the tracker cannot be read, or
    it is gone while ``iter_*`` checkpoints remain: with ``fallback`` the newest ``iter_*``
    checkpoint older than the tracker's iteration (any, when the tracker cannot be read) that
    verifies; else, or when there is none, the DamagedCheckpointError (without ``fallback`` it
    names ``fallback_flag`` when there are earlier checkpoints to fall back to). Reads files only
    (no collectives): ``choose_checkpoint`` runs it on one rank for all."""
    root = Path(root)
    try:
        path = find_checkpoint(root, flag)
        if path is None:
            left = list_checkpoints(root)
            if not left:
                return None, None
            raise DamagedCheckpointError(f"{flag} {root}: no {TRACKER}, but {len(left)} checkpoint directories are "
                                         f"there (newest {left[0][1]}): the tracker was lost")
        verify_checkpoint(path, flag)
        return path, None
    except DamagedCheckpointError as error:
        latest = _tracked_iteration(root)
        earlier = [(iteration, candidate) for iteration, candidate in list_checkpoints(root)
                   if latest is None or (latest != RELEASE and iteration < latest)]
        if not fallback:
            if fallback_flag and earlier:
                raise DamagedCheckpointError(f"{error} ({fallback_flag} would load the newest earlier checkpoint "
                                             f"that verifies instead: {len(earlier)} there)") from None
            raise
        rejected = []
        for iteration, candidate in earlier:
            try:
                verify_checkpoint(candidate, flag)
            except DamagedCheckpointError as e:
                rejected.append(str(e))
                continue
            also = "".join(f"\n  also damaged: {r}" for r in rejected)
            return candidate, (f"WARNING: {error}\n  {fallback_flag}: loading {candidate} (iteration {iteration}), "
                               f"the newest earlier checkpoint that verifies{also}")
        also = "".join(f"; also damaged: {r}" for r in rejected)
        raise DamagedCheckpointError(f"{error}; {fallback_flag}: no earlier checkpoint in {root} verifies{also}") \
            from None


def choose_checkpoint(root: str | os.PathLike, flag: str = "--load", fallback: bool = False,
                      fallback_flag: str | None = None) -> Path | None:
    """``select_checkpoint`` on rank 0, its verdict broadcast: every rank returns the same directory
    (None: no checkpoint) or raises the same error; rank 0 prints the fallback note.
    ``fallback_flag``: the option that turns the fallback on, named in errors (None: the caller
    has none). Every rank calls this."""
    verdict: list = [None]
    if dist.get_rank() == 0:
        try:
            path, note = select_checkpoint(root, flag, fallback, fallback_flag or "")
            verdict = [("ok", None if path is None else str(path), note)]
        except DamagedCheckpointError as e:
            verdict = [("damaged", str(e), None)]
        except CheckpointError as e:
            verdict = [("error", str(e), None)]
        except Exception as e:  # noqa: BLE001 -- the other ranks must not wait for a verdict that never comes
            verdict = [("error", f"{flag} {root}: cannot check its checkpoint: {failure_reason(e)}", None)]
    dist.broadcast_object_list(verdict, src=0)
    kind, value, note = verdict[0]
    if kind == "damaged":
        raise DamagedCheckpointError(value)
    if kind == "error":
        raise CheckpointError(value)
    if note:
        rank0_print(note)
    return None if value is None else Path(value)


def open_checkpoint(path: Path, flag: str = "--load") -> CheckpointHeader:
    """``path``'s header, announced on rank 0 with the layout that wrote it and this run's; a
    torch-format checkpoint must be of this run's TP/PP/VPP."""
    header, layout = read_header(path, flag), ParallelLayout.current()
    saved, root = header.parallel, path.parent
    named = "release" if path.name == "release" else f"iteration {header.iteration}"
    rank0_print(f"loading {header.format} checkpoint from {path} at {named} (written by {saved.describe()}"
                f"{', distributed optimizer' if saved.distributed_optimizer else ''}; this run: {layout.describe()})")
    if header.format == "torch" and not saved.matches(layout, MODEL_PARALLEL):
        raise CheckpointError(f"{flag} {root}: {path} is a torch-format checkpoint (one file per model-parallel rank) "
                              f"of {saved.describe()}; it loads only into the same TP/PP/VPP (this run: "
                              f"{layout.describe()}); resplit it with mm-convert or save with --ckpt-format torch_dist")
    return header


# ---------------------------------------------------------------------------------------------- torch_dist


def model_sharded_state(model_chunks: Sequence[torch.nn.Module], keep: Keep | None = None) -> dict:
    """``{chunk key: the chunk's sharded_state_dict()}``: the model part of a torch_dist checkpoint;
    ``keep``: only the tensors whose state-dict names it accepts (a LoRA run's adapters, or its base)."""
    return {key: {name: value for name, value in unwrap(chunk).sharded_state_dict().items()
                  if keep is None or keep(name)}
            for key, chunk in zip(chunk_keys(len(model_chunks)), model_chunks)}


def check_adapters(header: CheckpointHeader, path: Path, flag: str, adapters: dict | None) -> None:
    """A checkpoint of a LoRA run holds adapters alone (``header.lora``): it is read as adapters, into a
    model with the same adapters (``adapters``: this run's, ``LoraSettings.to_dict``), never as whole
    weights (``adapters`` None); CheckpointError naming ``flag`` and what to give instead."""
    saved, root = header.lora, path.parent
    if adapters is None and saved is not None:
        raise CheckpointError(f"{flag} {root}: {path} holds LoRA adapters alone (r {saved['r']}, {len(saved['targets'])} "
                              f"linear(s) per layer), no base weights; give the base model here (a converted release or "
                              f"a full checkpoint) and the adapters to --lora-load (training) or inference.lora "
                              f"(sampling), or merge them into the base with mm-convert mm_to_hf --cfg.lora_path")
    if adapters is None:
        return
    if saved is None:
        raise CheckpointError(f"{flag} {root}: {path} holds whole weights, no LoRA adapters; give a LoRA run's --save "
                              f"directory (the base model goes to --load)")
    if saved["r"] != adapters["r"] or saved["targets"] != adapters["targets"]:
        raise CheckpointError(f"{flag} {root}: {path} holds adapters of rank {saved['r']} on {saved['targets']}; this "
                              f"run's are of rank {adapters['r']} on {adapters['targets']} (--lora-r and "
                              f"--lora-target-modules must be the ones it was trained with)")


def _load_filtered(chunk: torch.nn.Module, state: dict, keep: Keep, where: str) -> None:
    """``state`` into ``chunk``, which must take every entry and have every tensor ``keep`` accepts in it."""
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if keep(k) and not k.endswith("._extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match this model: not in the checkpoint {missing[:20]}; not in "
                              f"this model {list(unexpected)[:20]}")


def _entries(value) -> list:
    """The ShardedTensors / ShardedObjects one state-dict value stands for in the checkpoint."""
    if isinstance(value, ShardedTensorFactory):
        return list(nested_values({"built": value.build()}))
    return [value] if isinstance(value, ShardedBase) else []


def _nested_items(state: dict, model_keys: list[str]):
    """(``"model"`` or the top-level key, value) for every leaf of the state to load."""
    for top, value in state.items():
        section = "model" if top in model_keys else top
        for leaf in nested_values({top: value}):
            yield section, leaf


def match_checkpoint(state: dict, model_keys: list[str], path: Path, where: str, strict: bool) -> None:
    """Compare what every rank asks for with what ``path`` holds, before megatron-core reads it (its
    own errors name neither the checkpoint nor the remedy, and a rank that fails alone leaves the
    others waiting). Model tensors of the wrong global shape, and optimizer or RNG entries that are
    not there, always fail; model tensors absent from the checkpoint (dropped from ``state``, so
    they keep their values) or never read fail only when ``strict``."""
    try:
        stored = {v.key: v for v in load_sharded_metadata(str(path)).values()}
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        raise DamagedCheckpointError(f"{where}: cannot read {path / DIST_INDEX}: {failure_reason(e)}") from None
    absent, shapes, asked = set(), set(), set()
    # the model keys one replica asks for: DP x CP rank 0 speaks for the others
    speaks = mpu.get_data_parallel_rank(with_context_parallel=True) == 0
    for section, value in _nested_items(state, model_keys):
        for entry in _entries(value):
            if speaks and section == "model":
                asked.add(entry.key)
            if entry.key not in stored:
                absent.add((section, entry.key))
            elif isinstance(entry, ShardedTensor) and tuple(stored[entry.key].global_shape) != entry.global_shape:
                shapes.add(f"{entry.key}: checkpoint {tuple(stored[entry.key].global_shape)}, "
                           f"this run {entry.global_shape}")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (absent, shapes, asked))
    absent = set().union(*(a for a, _, _ in everyone))
    shapes = sorted(set().union(*(s for _, s, _ in everyone)))
    asked = set().union(*(k for _, _, k in everyone))
    absent_model = sorted(k for section, k in absent if section == "model")
    absent_other = sorted(k for section, k in absent if section != "model")
    unread = sorted(k for k in set(stored) - asked if not k.startswith(_NOT_MODEL))
    lines = []
    if shapes:
        lines.append(f"  different global shapes ({len(shapes)}): {'; '.join(shapes[:20])}")
    if strict and absent_model:
        lines.append(f"  not in the checkpoint ({len(absent_model)}): {', '.join(absent_model[:20])}")
    if strict and unread:
        lines.append(f"  in the checkpoint but not in this model ({len(unread)}): {', '.join(unread[:20])}")
    if absent_other:
        lines.append(f"  optimizer/RNG/EMA state not in the checkpoint ({len(absent_other)}): "
                     f"{', '.join(absent_other[:20])} (load with --no-load-optim / --no-load-rng)")
    if lines:
        raise CheckpointError("\n".join([f"{where} does not match this model:"] + lines))
    if absent_model or unread:
        rank0_print(f"WARNING: {where}: model tensors not in the checkpoint (kept as they are): {absent_model}; "
                    f"checkpoint tensors this model does not have: {unread}")
    for key in model_keys:
        state[key] = {k: v for k, v in state[key].items() if not any(e.key in absent_model for e in _entries(v))}


def load_sharded(path: Path, state: dict, model_keys: list[str], strict: bool, flag: str = "--load") -> dict:
    """``state`` (the model's sharded state under ``model_keys``, and whatever else the caller
    asks for) read from the torch_dist checkpoint ``path``, after ``match_checkpoint``."""
    match_checkpoint(state, model_keys, path, f"{flag} {path.parent}: {path}", strict)
    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)),
                                                mpu.get_data_parallel_group(with_context_parallel=True))
    try:
        return dist_checkpointing.load(state, str(path), strategy)
    except (Exception, CheckpointException) as e:  # megatron's errors name tensors, not the checkpoint or flag
        raise DamagedCheckpointError(f"{flag} {path.parent}: cannot read {path}: {failure_reason(e)}") from e


def load_model_state(model_chunks: Sequence[torch.nn.Module], loaded: dict, strict: bool,
                     keep: Keep | None = None) -> None:
    """Each chunk's part of what ``load_sharded`` returned, into the chunk (``keep``: the part of the
    model it holds, ``model_sharded_state``'s)."""
    for key, chunk in zip(chunk_keys(len(model_chunks)), model_chunks):
        if keep is None:
            unwrap(chunk).load_state_dict(loaded[key], strict=strict)
        else:
            unwrap(chunk).load_state_dict(loaded[key], strict=False)  # match_checkpoint compared the keys


# ---------------------------------------------------------------------------------------------- torch


def my_rank_dir(path: Path) -> Path:
    """This rank's ``mp_rank_XX[_YYY]`` under a torch-format checkpoint ``path``."""
    return rank_dir(path, mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(),
                    mpu.get_pipeline_model_parallel_world_size())


def read_model_file(path: Path, model_chunks: Sequence[torch.nn.Module], strict: bool, flag: str = "--load",
                    keep: Keep | None = None) -> dict:
    """This rank: read its (TP, PP) rank's file of the torch-format checkpoint ``path`` and load the
    model chunks from it (no collectives, so a rank that fails here can tell the others before
    anyone waits). Returns the file's dict (optimizer, scheduler, RNG, EMA for the caller); a file
    that cannot be read is a DamagedCheckpointError naming it."""
    mine = my_rank_dir(path) / MODEL_FILE
    state = load_torch_file(mine, f"{flag} {path.parent}", weights_only=False)
    keys = chunk_keys(len(model_chunks))
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"{mine} has no {', '.join(missing)} (holds {sorted(state)})")
    for key, chunk in zip(keys, model_chunks):
        chunk = unwrap(chunk)
        loaded = dict(state[key])
        # megatron layers' _extra_state entries carry nothing for these layers; weights written by
        # mm-convert leave them out
        for name, value in chunk.state_dict().items():
            if name.endswith("._extra_state") and name not in loaded:
                loaded[name] = value
        if keep is None:
            chunk.load_state_dict(loaded, strict=strict)
        else:
            _load_filtered(chunk, loaded, keep, f"{flag} {path.parent}: {mine}")
    return state


# ---------------------------------------------------------------------------------------------- both


def load_model(load_dir: str | os.PathLike, model_chunks: Sequence[torch.nn.Module], *, strict: bool = True,
               flag: str = "--load", keep: Keep | None = None, adapters: dict | None = None) -> CheckpointHeader:
    """The model weights of the checkpoint the tracker in ``load_dir`` names (either format; no
    optimizer, RNG or EMA) into this rank's model chunks (megatron-wrapped or bare, one per virtual
    pipeline chunk). Returns its header. ``strict``: every model tensor must be in the checkpoint
    and every model tensor of the checkpoint read by some rank. ``keep``: the model's tensors to load, by
    state-dict name (a LoRA model's base, or its adapters); ``adapters``: the model's LoRA adapters
    (``LoraSettings.to_dict``) when the checkpoint is to be an adapter checkpoint (``check_adapters``).
    CheckpointError when ``load_dir`` holds no checkpoint or it does not fit. Every rank calls this."""
    root = Path(load_dir)
    path = choose_checkpoint(root, flag)
    if path is None:
        raise CheckpointError(f"{flag} {root}: no checkpoint there (no {TRACKER}); give mm-convert's output or a "
                              "training run's --save directory")
    header = open_checkpoint(path, flag)
    check_adapters(header, path, flag, adapters)
    if header.format == "torch":
        error = None
        try:
            read_model_file(path, model_chunks, strict, flag, keep)
        except CheckpointError as e:
            error = e
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            error = f"{flag} {root}: cannot load {path}: {type(e).__name__}: {e}"
        agree(error)
    else:
        keys = chunk_keys(len(model_chunks))
        loaded = load_sharded(path, model_sharded_state(model_chunks, keep), keys, strict, flag)
        load_model_state(model_chunks, loaded, strict, keep)
    dist.barrier()
    rank0_print(f"  loaded model weights from {path}")
    return header
