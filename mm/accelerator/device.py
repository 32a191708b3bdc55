"""Which accelerator this process uses: cuda + nccl, npu + hccl, or cpu + gloo.

The choice is made once per process by ``select_accelerator`` (from the ``--accelerator`` flag,
else the ``MM_ACCELERATOR`` environment variable, else automatically: a CUDA GPU, then an Ascend
NPU, then the CPU) and read everywhere else through ``get_accelerator()``. This module is the only
place in mm that names a device type; the rest of the package asks the ``Accelerator``.

Selecting the NPU imports ``torch_npu`` and ``torch_npu.contrib.transfer_to_npu``, which redirects
``torch.cuda`` to the NPU, so megatron-core runs unchanged. Selecting the CPU installs
``cuda_on_cpu``, which does the same for CPU processes over gloo.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from mm.accelerator import cuda_on_cpu

ACCELERATOR_CHOICES = ("auto", "cuda", "npu", "cpu")
ACCELERATOR_ENV = "MM_ACCELERATOR"

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def backend_accepted(accelerator_name: str, backend: str) -> bool:
    """Whether ``--distributed-backend backend`` fits the accelerator. MindSpeed-MM's NPU scripts
    pass ``nccl``, which torch_npu maps to hccl, so that is accepted on the NPU too."""
    return backend == BACKENDS[accelerator_name] or (accelerator_name == "npu" and backend == "nccl")


class AcceleratorError(RuntimeError):
    """The requested accelerator cannot be used on this machine."""


@dataclass(frozen=True)
class Accelerator:
    """A device type and the process-group backend that goes with it."""

    name: str  # "cuda", "npu" or "cpu"
    backend: str  # "nccl", "hccl" or "gloo"

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    @property
    def module(self) -> Any:
        """``torch.cuda`` / ``torch.npu`` / ``torch.cpu``: the per-device API namespace."""
        return getattr(torch, self.name)

    def device(self, local_rank: int | None = None) -> torch.device:
        if self.is_cpu:
            return torch.device("cpu")
        index = self.module.current_device() if local_rank is None else local_rank
        return torch.device(self.name, index)

    @property
    def fused_adam(self) -> bool:
        """Whether the optimizer steps with torch's fused Adam kernel here (CUDA; the CPU keeps
        megatron's default foreach step, torch_npu brings its own optimizers)."""
        return self.name == "cuda"

    def set_device(self, local_rank: int) -> None:
        if not self.is_cpu:
            self.module.set_device(local_rank)

    def device_count(self) -> int:
        return 1 if self.is_cpu else self.module.device_count()

    def synchronize(self) -> None:
        if not self.is_cpu:
            self.module.synchronize()

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on this device since the last reset (0 on the CPU)."""
        return 0 if self.is_cpu else self.module.max_memory_allocated()

    def device_name(self) -> str:
        """What the device is, in words (the GPU/NPU model; "cpu")."""
        return "cpu" if self.is_cpu else self.module.get_device_name()

    def memory_allocated(self) -> int:
        """Bytes allocated on this device now (0 on the CPU)."""
        return 0 if self.is_cpu else self.module.memory_allocated()

    def empty_cache(self) -> None:
        """Hand the caching allocator's unused blocks back (nothing on the CPU)."""
        if not self.is_cpu:
            self.module.empty_cache()

    def reset_peak_memory_stats(self) -> None:
        if not self.is_cpu:
            self.module.reset_peak_memory_stats()


_SELECTED: Accelerator | None = None


def _npu_present() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    importlib.import_module("torch_npu")
    return bool(torch.npu.is_available())


def _activate_npu() -> None:
    importlib.import_module("torch_npu")
    importlib.import_module("torch_npu.contrib.transfer_to_npu")


def _resolve(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _npu_present():
            return "npu"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise AcceleratorError(
            f"--accelerator / {ACCELERATOR_ENV} = 'cuda', but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); valid here: 'cpu' or 'auto'"
        )
    if requested == "npu" and not _npu_present():
        raise AcceleratorError(
            f"--accelerator / {ACCELERATOR_ENV} = 'npu', but torch_npu is not installed or sees no "
            "NPU; install torch_npu (pip install mm[npu]) and source CANN's set_env.sh, or use 'cpu'"
        )
    return requested


def select_accelerator(requested: str | None = None) -> Accelerator:
    """Choose the accelerator for this process (once) and prepare torch for it.

    ``requested`` comes from the ``--accelerator`` flag; ``None`` falls back to the
    ``MM_ACCELERATOR`` environment variable, then to ``"auto"``. Selecting a different accelerator
    after one was chosen is an error: megatron-core's state cannot move between devices.
    """
    global _SELECTED
    if requested is None:
        requested = os.environ.get(ACCELERATOR_ENV, "auto")
    if requested not in ACCELERATOR_CHOICES:
        raise AcceleratorError(
            f"--accelerator / {ACCELERATOR_ENV} = {requested!r}; valid: {', '.join(ACCELERATOR_CHOICES)}"
        )
    name = _resolve(requested)
    if _SELECTED is not None:
        if _SELECTED.name != name:
            raise AcceleratorError(
                f"accelerator already selected as {_SELECTED.name!r} in this process; cannot switch to {name!r}"
            )
        return _SELECTED
    if name == "npu":
        _activate_npu()
    elif name == "cpu":
        cuda_on_cpu.install()
    _SELECTED = Accelerator(name=name, backend=BACKENDS[name])
    return _SELECTED


def get_accelerator() -> Accelerator:
    """The accelerator of this process, selecting one automatically if nobody has yet."""
    return _SELECTED if _SELECTED is not None else select_accelerator()

