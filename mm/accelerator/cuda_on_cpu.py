"""Run megatron-core's CUDA-only code paths on CPU processes.

megatron-core creates tensors with ``device="cuda"`` or ``device=torch.cuda.current_device()``,
calls ``.cuda()``, checks ``param.type() == 'torch.cuda.FloatTensor'``, keeps its RNG states in
the CUDA generator, and synchronises/streams through ``torch.cuda``. On a machine without a GPU
those calls fail, which would leave every parallel feature untestable in CI.

``install()`` redirects all of that to the CPU for the whole process, the way
``torch_npu.contrib.transfer_to_npu`` redirects ``torch.cuda`` to the NPU:

* a ``TorchFunctionMode`` rewrites a CUDA ``device`` argument (``"cuda"``, ``"cuda:N"``,
  ``torch.device("cuda")`` or a bare ordinal) to ``"cpu"`` in every torch call, turns
  ``Tensor.cuda()`` / ``Tensor.to("cuda")`` / ``pin_memory()`` into CPU no-ops and reports CPU
  tensors with their CUDA type names (``Tensor.type()``) so type checks written for GPUs pass;
* the ``torch.cuda`` functions megatron-core calls are replaced by CPU equivalents: the RNG
  functions and ``default_generators`` act on the CPU generator (so megatron's RNG tracker forks
  the generator that CPU ops actually draw from), streams and events are host objects that
  order nothing (CPU ops are synchronous), memory statistics read zero;
* names that megatron modules imported from ``torch.cuda`` before ``install()`` ran are rebound
  to the replacements.

Only ``mm.accelerator`` calls ``install()``, and only when the selected accelerator is the CPU.
It is process-wide and meant to stay for the life of the process; ``uninstall()`` exists for tests.
The mode is thread-local: ``install()`` pushes it on the calling thread (the main thread); work on
other threads that must see the redirection should call ``ensure_installed_on_this_thread()``.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_PREFIX = "torch.cuda."
_GRAD = torch.Tensor.grad  # the descriptor; a mode sees its __get__ (a new wrapper each time)
# torch's words when a non-leaf tensor's .grad is read that is not there; it attributes the warning to the
# Python frame that made the call, which under the mode is the mode's own (see _non_leaf_grad)
NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed."


def _is_grad_getter(func: Any) -> bool:
    return getattr(func, "__self__", None) is _GRAD and getattr(func, "__name__", "") == "__get__"


def _non_leaf_grad(tensor: torch.Tensor, caller) -> Any:
    """``tensor.grad`` of a non-leaf tensor, with torch's warning about it (when torch gives one: the
    gradient is not there and the tensor does not retain it) attributed to the code that read it,
    ``caller`` (a frame), as it is without the mode: warning filters (``mm.accelerator.notices``, the
    user's) and the once-per-location registry see the same module and line as on a GPU. torch's own
    warning, raised from this module, is filtered by ``install``."""
    value = _GRAD.__get__(tensor)
    if value is None and not tensor.retains_grad:
        full = (NON_LEAF_GRAD + " Its .grad attribute won't be populated during autograd.backward(). If you indeed "
                "want the .grad field to be populated for a non-leaf Tensor, use .retain_grad() on the non-leaf Tensor. "
                "If you access the non-leaf Tensor by mistake, make sure you access the leaf Tensor instead. See "
                "github.com/pytorch/pytorch/pull/30531 for more information.")
        warnings.warn_explicit(full, UserWarning, caller.f_code.co_filename, caller.f_lineno,
                               module=caller.f_globals.get("__name__", "<unknown>"),
                               registry=caller.f_globals.setdefault("__warningregistry__", {}))
    return value


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare ordinal names the current accelerator
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_if_cuda(device: Any) -> Any:
    return "cpu" if _is_cuda_device(device) else device


def _run_backward(tensors: Any, grad_tensors: Any = None, retain_graph: bool | None = None,
                  create_graph: bool = False, inputs: Any = None) -> None:
    """The body of ``torch.autograd.backward`` below its ``__torch_function__`` dispatch."""
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    if grad_tensors is None or isinstance(grad_tensors, torch.Tensor):
        grad_tensors = (grad_tensors,) * len(tensors) if grad_tensors is None else (grad_tensors,)
    grads = torch.autograd._make_grads(tensors, tuple(grad_tensors), is_grads_batched=False)
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    torch.autograd.graph._engine_run_backward(
        tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph, inputs,
        allow_unreachable=True, accumulate_grad=True,
    )


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_grad_getter(func) and not args[0].is_leaf:
            return _non_leaf_grad(args[0], sys._getframe(1))
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # A mode is off the stack while it handles a call, so backward would run megatron's
            # autograd Functions (which allocate on torch.cuda.current_device()) without it; run
            # the engine with the mode pushed again instead.
            if func is torch.Tensor.backward:
                names = ("gradient", "retain_graph", "create_graph", "inputs")
                call = dict(zip(names, args[1:]), **kwargs)
                call["grad_tensors"] = call.pop("gradient", None)
                call["tensors"] = args[0]
            else:
                names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
                call = dict(zip(names, args), **kwargs)
                call.pop("grad_variables", None)
            with self:
                return _run_backward(**call)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func in (torch.Tensor.pin_memory, torch.Tensor.record_stream):
            return args[0] if func is torch.Tensor.pin_memory else None
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type:
            if len(args) == 1 and "dtype" not in kwargs:
                name = func(*args, **kwargs)
                if args[0].device.type == "cpu" and not name.startswith(_CUDA_TYPE_PREFIX):
                    return _CUDA_TYPE_PREFIX + name[len("torch."):]
                return name
            if len(args) > 1 and isinstance(args[1], str) and args[1].startswith(_CUDA_TYPE_PREFIX):
                args = (args[0], "torch." + args[1][len(_CUDA_TYPE_PREFIX):], *args[2:])
        return func(*args, **kwargs)


class HostEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so an event is complete as soon
    as it is recorded; ``elapsed_time`` measures host time between two records, in ms."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
                 external: bool = False):
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end_event: "HostEvent") -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("elapsed_time needs both events to have been recorded")
        return (end_event._time - self._time) * 1000.0


class HostStream:
    """Stand-in for ``torch.cuda.Stream``: one in-order host stream, nothing to wait for."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any):
        self.device = torch.device("cpu")
        self.priority = priority

    def wait_stream(self, stream: "HostStream") -> None:
        return None

    def wait_event(self, event: HostEvent) -> None:
        return None

    def record_event(self, event: HostEvent | None = None) -> HostEvent:
        event = event or HostEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def __enter__(self) -> "HostStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_DEFAULT_STREAM = HostStream()


class _DeviceContext:
    """Stand-in for ``torch.cuda.device(idx)``: there is only one CPU device."""

    def __init__(self, device: Any = None):
        self.idx = 0

    def __enter__(self) -> "_DeviceContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _set_rng_state(new_state: torch.Tensor, device: Any = None) -> None:
    torch.set_rng_state(new_state)


def _get_rng_state(device: Any = None) -> torch.Tensor:
    return torch.get_rng_state()


def _distinct(fn: Any) -> Any:
    """A new function object calling ``fn``. torch.compile's trace rules map each ``torch.cuda``
    name to a rule by object identity and reject one object under two names with different rules,
    so no replacement object may stand under two names."""
    if not callable(fn) or isinstance(fn, type):
        return fn
    return lambda *args, **kwargs: fn(*args, **kwargs)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _replacements() -> dict[str, Any]:
    """Attribute of ``torch.cuda`` -> its CPU replacement (each a distinct object)."""
    return {name: _distinct(value) for name, value in _replacement_targets().items()}


def _replacement_targets() -> dict[str, Any]:
    noop, zero = _noop, _zero
    return {
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "set_device": noop,
        "synchronize": noop,
        "empty_cache": noop,
        "device": _DeviceContext,
        "Stream": HostStream,
        "Event": HostEvent,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "stream": lambda stream=None: contextlib.nullcontext(stream),
        # the CPU generator itself: torch.manual_seed() calls torch.cuda.manual_seed_all()
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)) and None,
        "manual_seed_all": lambda seed: torch.default_generator.manual_seed(int(seed)) and None,
        "seed": lambda: torch.default_generator.seed() and None,
        "initial_seed": lambda: torch.default_generator.initial_seed(),
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "get_rng_state_all": lambda: [torch.get_rng_state()],
        "set_rng_state_all": lambda states: torch.set_rng_state(states[0]),
        "default_generators": (torch.default_generator,),
        "_lazy_call": lambda callable_, **kwargs: callable_(),
        "_lazy_init": noop,
        "is_initialized": lambda: True,
        "memory_allocated": zero,
        "max_memory_allocated": zero,
        "memory_reserved": zero,
        "max_memory_reserved": zero,
        "reset_peak_memory_stats": noop,
        "reset_max_memory_allocated": noop,
    }


_RANDOM_MODULE_NAMES = ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "seed",
                        "initial_seed", "get_rng_state_all", "set_rng_state_all")

_lock = threading.Lock()
_saved: dict[tuple[Any, str], Any] = {}
_rebound: list[tuple[Any, str, Any]] = []
_modes: dict[int, _CudaToCpuMode] = {}


def is_installed() -> bool:
    return bool(_saved)


def _patch(owner: Any, name: str, value: Any) -> None:
    key = (owner, name)
    if key not in _saved:
        _saved[key] = getattr(owner, name, None)
    setattr(owner, name, value)


def _rebind_imported_names(originals: dict[int, Any], replacement_of: dict[int, Any]) -> None:
    """Rebind ``from torch.cuda import x`` names that megatron modules took before install()."""
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith("megatron"):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in originals and originals[id(value)] is value:
                _rebound.append((module, attr, value))
                setattr(module, attr, replacement_of[id(value)])


def ensure_installed_on_this_thread() -> None:
    """Push the device-rewriting mode on the calling thread if it is not there yet."""
    tid = threading.get_ident()
    if tid not in _modes:
        mode = _CudaToCpuMode()
        mode.__enter__()
        _modes[tid] = mode


def install() -> None:
    """Redirect ``torch.cuda`` and CUDA device arguments to the CPU (idempotent)."""
    with _lock:
        if not _saved:
            originals: dict[int, Any] = {}
            replacement_of: dict[int, Any] = {}
            for name, value in _replacements().items():
                old = getattr(torch.cuda, name, None)
                if old is not None and not isinstance(old, (int, float, str, tuple)):
                    originals[id(old)] = old
                    replacement_of[id(old)] = value
                _patch(torch.cuda, name, value)
                if name in _RANDOM_MODULE_NAMES:
                    _patch(torch.cuda.random, name, _distinct(value))
            _patch(torch.cuda.nvtx, "range_push", _distinct(_noop))
            _patch(torch.cuda.nvtx, "range_pop", _distinct(_noop))
            _rebind_imported_names(originals, replacement_of)
        # torch's warning as raised inside the mode; _non_leaf_grad raises it again from the reader's line
        # (added on every call: warnings.catch_warnings may have dropped it since; an identical filter is replaced)
        warnings.filterwarnings("ignore", message=re.escape(NON_LEAF_GRAD), category=UserWarning,
                                module=re.escape(__name__) + r"\Z")
        ensure_installed_on_this_thread()


def uninstall() -> None:
    """Undo ``install()`` (for tests that need the process as it was)."""
    with _lock:
        tid = threading.get_ident()
        mode = _modes.pop(tid, None)
        if mode is not None:
            mode.__exit__(None, None, None)
        for (owner, name), value in _saved.items():
            setattr(owner, name, value)
        _saved.clear()
        for module, attr, value in _rebound:
            setattr(module, attr, value)
        _rebound.clear()
