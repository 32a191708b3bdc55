"""The known-harmless notices of third-party code, silenced by their exact message and module.

megatron-core, torch and diffusers print notices on every start that say nothing about the run: a
missing Transformer Engine/Apex that mm does not use, a deprecation tripped by megatron-core's own
defaults, a CUDA toolkit without a GPU. They come once per process, so an 8-rank run repeats each
eight times around mm's own lines. ``quiet_known_notices`` installs, once per process and before those
libraries are imported, a filter for each notice of ``NOTICES`` (a Python warning: its message,
category and the module it is attributed to; a ``logging`` record: its logger and message) and
nothing else: other warnings, real problems included, stay visible.

The switch: ``MM_VERBOSE=1`` in the environment, or ``--verbose`` on the entry point's command line,
shows them again on rank 0; every other rank keeps them silenced (they are the same on every rank),
and also keeps HuggingFace's progress bars off (``HF_HUB_DISABLE_PROGRESS_BARS``), which rank 0 shows.

This is layer 1 because the switch is read from the environment (and from the command line before the
flags are parsed: most of these notices fire while megatron-core is imported).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

VERBOSE_ENV = "MM_VERBOSE"
VERBOSE_FLAG = "--verbose"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Notice:
    """One known-harmless notice. ``kind`` "warning": a Python warning of ``category`` whose message
    matches ``message`` and whose module (the one ``warnings`` attributes it to) matches ``module``
    in full; "log": a record of the logger named ``module`` whose message matches ``message``.
    ``message`` is a regular expression matched from the message's start; ``why`` says why it is
    harmless for mm."""

    kind: str
    module: str
    message: str
    why: str
    category: type[Warning] = UserWarning


def _exact(text: str) -> str:
    return re.escape(text) + r"\Z"


_NO_TE_APEX = "mm uses plain torch modules and torch optimizers; it needs neither Transformer Engine nor Apex"

NOTICES: tuple[Notice, ...] = (
    Notice("log", "torch.utils.cpp_extension", r"No CUDA runtime is found, using CUDA_HOME='[^']*'\Z",
           "a CUDA toolkit on a machine without a GPU (CPU or NPU runs); mm compiles no CUDA extension"),
    Notice("warning", r"megatron\.core\.optimizer",
           _exact("Transformer Engine and Apex are not installed. Falling back to Torch optimizers."), _NO_TE_APEX),
    Notice("warning", r"megatron\.core\.optimizer\.optimizer|megatron\.core\.distributed\.fsdp\.src\.megatron_fsdp"
           r"\.mixed_precision",
           _exact("Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier and multi_tensor_scale"), _NO_TE_APEX),
    Notice("warning", r"megatron\.core\.optimizer\.clip_grads",
           _exact("Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"), _NO_TE_APEX),
    Notice("warning", r"megatron\.core\.models\.backends", _exact("Apex is not installed. Falling back to Torch Norm"),
           _NO_TE_APEX),
    Notice("warning", r"megatron\.core\.models\.mimo\.config\.base_configs",
           _exact("MimoModelConfig is experimental and still under active development. The API may change without "
                  "notice in future releases."),
           "megatron-core imports its MIMO model on the way to what mm uses; mm does not use it"),
    Notice("warning", r"megatron\.core\.transformer\.transformer_config",
           _exact("full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer."),
           "megatron-core's own default of cuda_graph_modules ('full') trips its deprecation; mm captures no CUDA "
           "graphs"),
    Notice("warning", r"megatron\.core\.optimizer\.optimizer",
           re.escape("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad "
                     "attribute won't be populated during autograd.backward()."),
           "megatron-core's distributed optimizer zeroes the gradients of its fp32 parameter shards, which are "
           "views (its own comment: 'throws grad-access warning')"),
    Notice("log", "megatron.core.distributed.distributed_data_parallel",
           _exact("DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True. "
                  "Auto-computing layout inside DDP. Callers should pre-compute layouts via "
                  "DistributedOptimizer.compute_full_param_layout() and pass them in."),
           "DDP computes the same layout the distributed optimizer would (megatron-core's backward compatibility)"),
    Notice("log", "megatron.core.dist_checkpointing.strategies.torch",
           _exact("MCore's async save is deprecated and will be removed in the future releases. Please, use NVRx "
                  "async solution by setting `async_strategy` to `nvrx`."),
           "megatron-core's synchronous save goes through its own deprecated async path; mm saves synchronously"),
    Notice("warning", r"torch\.distributed\.checkpoint\.logger",
           _exact("The argument order of load has been changed. Please check the document to avoid future "
                  "breakages."),
           "megatron-core's torch_dist load calls torch.distributed.checkpoint.load with positional arguments"),
    Notice("warning", r"torch\.distributed\.checkpoint\.utils",
           _exact("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
                  "single process."),
           "megatron-core's fully parallel load reads each rank's shards with no_dist=True, by design"),
    Notice("log", "diffusers.models.modeling_utils",
           r"There are modules in \w+ that should be kept in float32: .*Casting directly with `to\(\)` can lead to "
           r"inconsistent results",
           "the benchmarks cast diffusers' reference DiT to bf16 whole on purpose, to time it as mm's"),
)


class _LogSilencer(logging.Filter):
    """Drops the records of one logger whose message matches one of its notices."""

    def __init__(self, patterns: Sequence[re.Pattern]):
        super().__init__()
        self.patterns = list(patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_installed: dict[str, list] = {}  # "warnings": the filter tuples added; "logging": (logger, filter) pairs


def verbose_requested(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """The switch: MM_VERBOSE=1 (or true/yes/on) in the environment, or --verbose among the arguments."""
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    return environ.get(VERBOSE_ENV, "").strip().lower() in _TRUE or VERBOSE_FLAG in argv


def launch_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as torchrun gives it (RANK); 0 without one."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("RANK", "0"))
    except ValueError:
        return 0


def quiet_known_notices(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Silence ``NOTICES`` in this process unless the switch is on and this is rank 0; on ranks other
    than 0 also turn HuggingFace's progress bars off. Call it first thing in an entry point, before
    megatron-core, torch.distributed.checkpoint or diffusers are imported; a second call changes nothing.
    Returns whether the notices are silenced."""
    environ = os.environ if environ is None else environ
    rank = launch_rank(environ)
    if rank != 0 and environ is os.environ:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if verbose_requested(argv, environ) and rank == 0:
        return False
    if not _installed:
        _install()
    return True


def show_known_notices(environ: Mapping[str, str] | None = None) -> None:
    """The switch given after the flags were parsed (``--verbose``): rank 0 shows the notices from here
    on; the other ranks keep them silenced."""
    if launch_rank(environ) != 0 or not _installed:
        return
    for entry in _installed.pop("warnings"):
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    warnings._filters_mutated()  # noqa: SLF001 (what warnings' own functions call after editing the list)
    for logger, silencer in _installed.pop("logging"):
        logger.removeFilter(silencer)
    _installed.clear()


def notices_silenced() -> bool:
    return bool(_installed)


def _install() -> None:
    added, loggers = [], {}
    for notice in NOTICES:
        if notice.kind == "warning":
            warnings.filterwarnings("ignore", message=notice.message, category=notice.category,
                                    module=notice.module + r"\Z")
            added.append(warnings.filters[0])
        else:
            loggers.setdefault(notice.module, []).append(re.compile(notice.message))
    pairs = []
    for name, patterns in loggers.items():
        logger, silencer = logging.getLogger(name), _LogSilencer(patterns)
        logger.addFilter(silencer)
        pairs.append((logger, silencer))
    _installed.update(warnings=added, logging=pairs)


__all__ = ["NOTICES", "Notice", "VERBOSE_ENV", "VERBOSE_FLAG", "launch_rank", "notices_silenced",
           "quiet_known_notices", "show_known_notices", "verbose_requested"]
