"""Configuration: Megatron-style flags + model JSON + data JSON, parsed and validated together."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from dataclasses import field
from typing import Any, Callable, Sequence

from mm.accelerator.attention_kernels import kernel_note
from mm.arguments.errors import ConfigError
from mm.arguments.flags import build_parser, parse_flags
from mm.arguments.json_configs import (
    AEConfig,
    ComponentConfig,
    DataConfig,
    ModelConfig,
    PredictorConfig,
    load_json,
    parse_data_config,
    parse_model_config,
)
from mm.arguments.validation import lora_notes, parallel_sizes, ulysses_degree, validate, virtual_pipeline_size
from mm.parallel.groups import ParallelSizes


@dataclass
class RunConfig:
    """Everything a run is configured with, validated."""

    args: argparse.Namespace
    model: ModelConfig
    data: DataConfig | None
    tool: dict[str, Any]
    sizes: ParallelSizes
    notes: list[str] = field(default_factory=list)  # what the user should know (printed by rank 0), not errors

    @property
    def virtual_pipeline_size(self) -> int | None:
        return virtual_pipeline_size(self.args)


def load_config(argv: Sequence[str] | None, world_size: int, mode: str = "train",
                accelerator: str | None = None, prog: str | None = None) -> RunConfig:
    """Parse flags and the JSON files they name, and validate all of it for ``world_size`` ranks.

    Raises ConfigError listing every problem; nothing is started before this returns.
    """
    return config_from_args(parse_flags(argv, prog=prog), world_size, mode, accelerator)


def apply_sequence_parallel_aliases(args: argparse.Namespace, section: dict, problems: list[str]) -> None:
    """Wan's and Phantom's ``ulysses_size`` x ``ring_size`` in the model JSON's ``inference`` section, as
    megatron-style flags: CP = ulysses x ring, Ulysses alone (ulysses_cp_algo), ring alone
    (megatron_cp_algo) or both (hybrid_cp_algo with --ulysses-degree-in-cp = ulysses_size)."""
    sizes = {}
    for key in ("ulysses_size", "ring_size"):
        value = section.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"inference.{key} = {value!r}; valid: an integer >= 1")
            return
        sizes[key] = value
    ulysses, ring = sizes["ulysses_size"], sizes["ring_size"]
    cp = ulysses * ring
    if cp == 1:
        return
    if args.context_parallel_size not in (1, cp):
        problems.append(f"inference.ulysses_size x ring_size = {ulysses} x {ring} = {cp}, but "
                        f"--context-parallel-size {args.context_parallel_size}; give one of the two")
        return
    args.context_parallel_size = cp
    if ring == 1:
        args.context_parallel_algo = "ulysses_cp_algo"
    elif ulysses == 1:
        args.context_parallel_algo = "megatron_cp_algo"
    else:
        args.context_parallel_algo, args.ulysses_degree_in_cp = "hybrid_cp_algo", ulysses


# (the model JSON, problems, notes) -> the model JSON in mm's terms (``mm.families.expand_model_json``)
Expand = Callable[[dict, list[str], list[str]], dict]


def _unused_pipeline_layout(args: argparse.Namespace, predictor, notes: list[str]) -> None:
    """MindSpeed-MM's JSONs keep ``predictor.pipeline_num_layers`` for their pipelined layout and launch the
    same file with PP 1, which ignores it: so does mm (with a note) when the layers add up."""
    layout = predictor.pipeline_num_layers
    if args.pipeline_model_parallel_size != 1 or not layout:
        return
    flat = [n for row in layout for n in (row if isinstance(row, list) else [row])]
    if all(isinstance(n, int) for n in flat) and sum(flat) == predictor.num_layers and len(layout) > 1:
        notes.append(f"predictor.pipeline_num_layers = {layout}: a layout of {len(layout)} pipeline stages, not used "
                     "with --pipeline-model-parallel-size 1")
        predictor.pipeline_num_layers = None


def config_from_args(args: argparse.Namespace, world_size: int, mode: str = "train",
                     accelerator: str | None = None, expand: Expand | None = None) -> RunConfig:
    """``load_config`` for flags that are already parsed; ``expand`` rewrites the model JSON first
    (inference: a release's own generate configuration, ``mm.families.expand_model_json``)."""
    problems: list[str] = []
    notes: list[str] = []
    data = load_json(args.mm_model, "--mm-model")
    if expand is not None:
        data = expand(data, problems, notes)
        if problems:  # the sections it would have built are missing: those are the problems to name
            raise ConfigError(problems)
    model = parse_model_config(data, args.mm_model, problems, require_predictor=mode != "vae", notes=notes)
    data = None
    if args.mm_data is not None:
        data = parse_data_config(load_json(args.mm_data, "--mm-data"), args.mm_data, problems, notes)
    tool = load_json(args.mm_tool, "--mm-tool") if args.mm_tool is not None else {}
    if not problems and mode == "inference":
        apply_sequence_parallel_aliases(args, model.extra.get("inference", {}), problems)
    if not problems and model.predictor is not None:
        _unused_pipeline_layout(args, model.predictor, notes)
    if not problems:
        problems = validate(args, model, data, world_size, mode=mode, accelerator=accelerator)
    if problems:
        raise ConfigError(problems)
    notes.extend(lora_notes(args))
    note = kernel_note(accelerator, args.attention_kernel) if accelerator is not None else None
    if note:
        notes.append(note)
    return RunConfig(args=args, model=model, data=data, tool=tool, sizes=parallel_sizes(args, model, world_size),
                     notes=notes)


__all__ = [
    "AEConfig",
    "ComponentConfig",
    "ConfigError",
    "DataConfig",
    "Expand",
    "ModelConfig",
    "PredictorConfig",
    "RunConfig",
    "build_parser",
    "config_from_args",
    "load_config",
    "parse_flags",
    "ulysses_degree",
    "validate",
]
