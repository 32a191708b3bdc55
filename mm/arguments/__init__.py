"""Configuration: Megatron-style flags + model JSON + data JSON, parsed and validated together."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

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
from mm.arguments.validation import parallel_sizes, ulysses_degree, validate, virtual_pipeline_size
from mm.parallel.groups import ParallelSizes


@dataclass
class RunConfig:
    """Everything a run is configured with, validated."""

    args: argparse.Namespace
    model: ModelConfig
    data: DataConfig | None
    tool: dict[str, Any]
    sizes: ParallelSizes

    @property
    def virtual_pipeline_size(self) -> int | None:
        return virtual_pipeline_size(self.args)


def load_config(argv: Sequence[str] | None, world_size: int, mode: str = "train",
                accelerator: str | None = None, prog: str | None = None) -> RunConfig:
    """Parse flags and the JSON files they name, and validate all of it for ``world_size`` ranks.

    Raises ConfigError listing every problem; nothing is started before this returns.
    """
    return config_from_args(parse_flags(argv, prog=prog), world_size, mode, accelerator)


def config_from_args(args: argparse.Namespace, world_size: int, mode: str = "train",
                     accelerator: str | None = None) -> RunConfig:
    """``load_config`` for flags that are already parsed."""
    problems: list[str] = []
    model = parse_model_config(load_json(args.mm_model, "--mm-model"), args.mm_model, problems)
    data = None
    if args.mm_data is not None:
        data = parse_data_config(load_json(args.mm_data, "--mm-data"), args.mm_data, problems)
    tool = load_json(args.mm_tool, "--mm-tool") if args.mm_tool is not None else {}
    if not problems:
        problems = validate(args, model, data, world_size, mode=mode, accelerator=accelerator)
    if problems:
        raise ConfigError(problems)
    return RunConfig(args=args, model=model, data=data, tool=tool, sizes=parallel_sizes(args, model, world_size))


__all__ = [
    "AEConfig",
    "ComponentConfig",
    "ConfigError",
    "DataConfig",
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
