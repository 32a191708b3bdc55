"""A checkpoint's header: what it says about itself, read and written here only.

Both formats hold the same entries: the torch format as ``checkpoint.json`` beside its rank
directories, torch_dist as common (unsharded) entries of its state dict. On disk::

    checkpoint_version   mm's content layout (CheckpointHeader.version); bump when keys change meaning
    iteration            the iteration saved (0 for converted weights)
    consumed_samples     global samples consumed by then
    parallel             the layout that wrote it (ParallelLayout)
    content              what it holds besides the model: optimizer? RNG? EMA? (Content)
    extra                entry_point, predictor (the model JSON's predictor keys), pipeline_layers
                         (predictor.pipeline_num_layers / mm-convert's pp_layers), lora (a LoRA run's
                         adapters: the checkpoint holds them alone), and the writer's own notes
                         (mm-convert: verb, source, its --version)

Every header mm has written carries ``checkpoint_version`` 1; one without it is not mm's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm.ckpt.layout import (
    DIST_INDEX,
    DIST_METADATA,
    HEADER_FILE,
    CheckpointError,
    DamagedCheckpointError,
    checkpoint_format,
    failure_reason,
)

CHECKPOINT_VERSION = 1
MODEL_PARALLEL = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "virtual_pipeline_model_parallel_size")
_TYPED_EXTRA = ("entry_point", "predictor", "pipeline_layers", "lora")  # kept under "extra" on disk


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel layout (megatron's names) and optimizer a checkpoint was written by."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    data_parallel_size: int = 1
    world_size: int = 1
    distributed_optimizer: bool = False
    # the distributed optimizer's format: torch_dist "fully_reshardable" / "dp_reshardable", torch "dp_zero"
    optimizer_sharding: str | None = None

    @classmethod
    def current(cls) -> ParallelLayout:
        """This run's layout (megatron's process groups must exist); no optimizer."""
        import torch.distributed as dist
        from megatron.core import parallel_state as mpu

        return cls(tensor_model_parallel_size=mpu.get_tensor_model_parallel_world_size(),
                   pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size(),
                   virtual_pipeline_model_parallel_size=mpu.get_virtual_pipeline_model_parallel_world_size(),
                   context_parallel_size=mpu.get_context_parallel_world_size(),
                   data_parallel_size=mpu.get_data_parallel_world_size(), world_size=dist.get_world_size())

    def matches(self, other: ParallelLayout, sizes: tuple[str, ...]) -> bool:
        """Whether ``other`` has the same ``sizes`` (field names)."""
        return all(getattr(self, name) == getattr(other, name) for name in sizes)

    def describe(self) -> str:
        vpp = self.virtual_pipeline_model_parallel_size
        return (f"TP{self.tensor_model_parallel_size} PP{self.pipeline_model_parallel_size}"
                f"{f' VPP{vpp}' if vpp else ''} CP{self.context_parallel_size} DP{self.data_parallel_size}")


@dataclass(frozen=True)
class Content:
    """What a checkpoint holds besides the model."""

    optimizer: bool = False
    rng: bool = False
    ema: bool = False


@dataclass
class CheckpointHeader:
    """One checkpoint's header (see the module docstring for its form on disk).

    Args:
        iteration: the iteration saved; 0 for converted weights (their tracker says "release").
        consumed_samples: global samples consumed by the end of ``iteration``.
        parallel: the layout that wrote it.
        content: what it holds besides the model.
        entry_point: the program that wrote it (``pretrain_t2v.py``, ``mm-convert``).
        predictor: the model JSON's predictor keys (the family's predictor config as a dict).
        pipeline_layers: the layers per pipeline stage (and virtual chunk) it was split into;
            None when the writer did not say.
        lora: a LoRA run's adapters (``mm.models.predictor.lora.LoraSettings.to_dict``: rank, alpha, the
            linears and parts adapted): the checkpoint then holds those adapters and no base weight; None
            for a checkpoint of whole weights.
        extra: the writer's other notes (JSON-able).
        version: mm's content layout, ``checkpoint_version`` on disk.
        format: ``torch`` or ``torch_dist``: where the header was found (not stored).
    """

    iteration: int
    consumed_samples: int
    parallel: ParallelLayout
    content: Content
    entry_point: str | None = None
    predictor: dict[str, Any] | None = None
    pipeline_layers: list | None = None
    lora: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = CHECKPOINT_VERSION
    format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The header's entries as stored (JSON-able)."""
        return {"checkpoint_version": self.version, "iteration": self.iteration,
                "consumed_samples": self.consumed_samples, "parallel": dataclasses.asdict(self.parallel),
                "content": dataclasses.asdict(self.content),
                # lora only where there are adapters: a header of whole weights reads as before it existed
                "extra": dict(self.extra, **{name: getattr(self, name) for name in _TYPED_EXTRA
                                             if name != "lora" or self.lora is not None})}

    @classmethod
    def from_dict(cls, stored: dict[str, Any], ckpt_format: str | None = None,
                  where: str = "checkpoint") -> CheckpointHeader:
        """The header of stored entries (other entries, e.g. torch_dist's scheduler state, are
        ignored); CheckpointError, naming ``where``, for a version this mm does not read or
        missing entries."""
        version = stored.get("checkpoint_version")
        if version is None:
            raise CheckpointError(f"{where} has no checkpoint_version: not a checkpoint mm wrote")
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(f"{where} has checkpoint_version {version}; this version of mm reads "
                                  f"{CHECKPOINT_VERSION}")
        try:
            extra = dict(stored["extra"] or {})
            typed = {name: extra.pop(name, None) for name in _TYPED_EXTRA}
            return cls(iteration=int(stored["iteration"]), consumed_samples=int(stored["consumed_samples"]),
                       parallel=ParallelLayout(**stored["parallel"]), content=Content(**stored["content"]),
                       extra=extra, version=version, format=ckpt_format, **typed)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: its header (checkpoint_version {version}) does not have the entries "
                                  f"this version of mm reads: {type(e).__name__}: {e}") from None


def read_header(path: Path, flag: str = "--load") -> CheckpointHeader:
    """The header of the checkpoint directory ``path`` (either format); ``flag`` names the option
    that led to it in errors. A header that cannot be read is a DamagedCheckpointError naming the
    file."""
    ckpt_format = checkpoint_format(path)
    where = f"{flag} {path.parent}: {path}"
    if ckpt_format == "torch":
        try:
            stored = json.loads((path / HEADER_FILE).read_text())
        except OSError as e:
            raise DamagedCheckpointError(f"{flag} {path.parent}: cannot read {path / HEADER_FILE}: "
                                         f"{failure_reason(e)}") from None
        except ValueError as e:
            raise DamagedCheckpointError(f"{where}: {HEADER_FILE} is not JSON: {e}") from None
    elif ckpt_format == "torch_dist":
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            stored = dist_checkpointing.load_common_state_dict(str(path))
        except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
            raise DamagedCheckpointError(f"{flag} {path.parent}: cannot read the header (common state) of {path} "
                                         f"through {path / DIST_INDEX}: {failure_reason(e)}") from None
    else:
        raise CheckpointError(f"{where} is not a checkpoint (neither {HEADER_FILE} nor torch_dist's {DIST_METADATA})")
    if not isinstance(stored, dict):
        raise DamagedCheckpointError(f"{where}: its header is a {type(stored).__name__}, not a dict of entries")
    return CheckpointHeader.from_dict(stored, ckpt_format, where)


def write_header(path: Path, header: CheckpointHeader) -> None:
    """The torch format's ``checkpoint.json`` in ``path`` (fsynced). torch_dist stores
    ``header.to_dict()`` among its common entries instead."""
    with open(path / HEADER_FILE, "w") as f:
        json.dump(header.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
