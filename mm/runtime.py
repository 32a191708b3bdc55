"""Start a run: configuration first, then the accelerator, the process groups and the RNG.

Every entry point (pretrain_*.py, inference.py) begins with ``start``: flags, model JSON and data
JSON are parsed and validated for the launch's world size before any process group exists; a bad
configuration ends the process with exit code 2 and a message naming each offending flag or key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from mm.accelerator import (
    Accelerator,
    LaunchEnv,
    die_with_launcher,
    init_distributed,
    naming_collective_failures,
    rank0_print,
    read_launch_env,
    select_accelerator,
    start_heartbeat,
)
from mm.accelerator.device import AcceleratorError
from mm.accelerator.notices import show_known_notices
from mm.accelerator.distributed import LaunchError
from mm.arguments import ConfigError, Expand, RunConfig, config_from_args, parse_flags
from mm.parallel import describe_layout, initialize_parallel


@dataclass
class Runtime:
    config: RunConfig
    accelerator: Accelerator
    launch: LaunchEnv


@dataclass(frozen=True)
class EntryPoint:
    """What an entry point validates before any process group: its ``prog`` name, ``mode`` ("train" or
    "inference"), its own ``check`` of the configuration (raises ConfigError) and the ``expand`` of its
    model JSON. ``start`` runs it in every process; ``mm.preflight`` runs the same once, before torchrun."""

    prog: str
    mode: str
    check: Callable[[RunConfig], object] | None = None
    expand: Expand | None = None


def model_json_reader(expand: Expand | None = None) -> Expand:
    """How an entry point reads its model JSON: another tool's layout of a family's JSON in mm's terms
    (``mm.families.translate_model_json``: MindSpeed-MM's Wan files), then the entry point's own ``expand``."""
    from mm.families import translate_model_json

    def read(data, problems, notes):
        data = translate_model_json(data, problems, notes)
        return data if expand is None or problems else expand(data, problems, notes)

    return read


def configure(argv: Sequence[str] | None, mode: str, prog: str | None = None,
              expand: Expand | None = None, world_size: int | None = None) -> tuple[RunConfig, Accelerator, LaunchEnv]:
    """Parse and validate everything; select the accelerator. Starts no process group. The world size is
    the launch environment's (torchrun's WORLD_SIZE) unless ``world_size`` is given (a pre-flight check)."""
    args = parse_flags(argv, prog=prog)
    accelerator = select_accelerator(args.accelerator)
    launch = read_launch_env() if world_size is None else LaunchEnv(0, world_size, 0, world_size, "127.0.0.1", 0)
    config = config_from_args(args, launch.world_size, mode=mode, accelerator=accelerator.name,
                              expand=model_json_reader(expand))
    return config, accelerator, launch


def configure_or_exit(argv: Sequence[str] | None, entry: EntryPoint,
                      world_size: int | None = None) -> tuple[RunConfig, Accelerator, LaunchEnv]:
    """``configure`` and the entry point's ``check``; a bad configuration prints ``<prog>: error: ...``
    (one line per problem) and exits with code 2."""
    try:
        config, accelerator, launch = configure(argv, entry.mode, entry.prog, entry.expand, world_size)
        if entry.check is not None:
            entry.check(config)
    except (ConfigError, AcceleratorError, LaunchError) as e:
        print(f"{entry.prog or sys.argv[0]}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return config, accelerator, launch


def _dynamic_max_cp(config: RunConfig, mode: str) -> int | None:
    """The model JSON's max_cp_size when training with use_dynamic_dpcp = true, else None."""
    model = getattr(config, "model", None)
    if mode != "train" or model is None or not getattr(model, "use_dynamic_dpcp", False):
        return None
    return model.max_cp_size


def start(argv: Sequence[str] | None = None, mode: str = "train", prog: str | None = None,
          check: Callable[[RunConfig], None] | None = None, expand: Expand | None = None) -> Runtime:
    """``configure`` (then the entry point's own ``check`` of the configuration, which raises
    ConfigError), then the default process group, megatron-core's and mm's groups, and seeds. A
    worker torchrun started dies with torchrun (``die_with_launcher``)."""
    die_with_launcher()
    config, accelerator, launch = configure_or_exit(argv, EntryPoint(prog, mode, check, expand))
    if config.args.verbose:
        show_known_notices()  # --verbose: rank 0 shows megatron-core's and torch's known notices again
    args = config.args
    init_distributed(accelerator, args.distributed_timeout_minutes, launch)
    start_heartbeat()  # what lets ranks wait for a slower peer without a collective (wait_for_peers)
    with naming_collective_failures("start-up (creating the process groups)"):
        initialize_parallel(config.sizes, virtual_pipeline_parallel=config.virtual_pipeline_size,
                            timeout_minutes=args.distributed_timeout_minutes, seed=args.seed,
                            cp_algo=args.context_parallel_algo, cp_overlap=args.use_cp_send_recv_overlap,
                            attention_kernel=args.attention_kernel,
                            dynamic_max_cp=_dynamic_max_cp(config, mode))
    rank0_print(
        f"mm: {launch.world_size} rank(s) on {accelerator.name} ({accelerator.backend}); "
        f"TP={config.sizes.tensor_parallel} PP={config.sizes.pipeline_parallel} "
        f"VPP={config.virtual_pipeline_size or 1} CP={config.sizes.context_parallel} "
        f"({args.context_parallel_algo}) DP={config.sizes.data_parallel}\n"
        f"rank 0 groups:\n{describe_layout(config.sizes, 0)}"
    )
    if mode != "train" and getattr(getattr(config, "model", None), "use_dynamic_dpcp", False):
        rank0_print(f"{prog or 'mm'}: note: use_dynamic_dpcp = true is read by training only; this run keeps the "
                    "layout of --context-parallel-size")
    if _dynamic_max_cp(config, mode) is not None:
        from mm.parallel.dynamic_cp import degrees

        dpcp = config.sizes.data_parallel * config.sizes.context_parallel
        rank0_print(f"{prog or 'mm'}: dynamic DP/CP over the {dpcp} data-parallel x context-parallel ranks: CP "
                    f"{', '.join(map(str, degrees()))} chosen per iteration (max_seq_size {config.model.max_seq_size})")
    for note in config.notes:
        rank0_print(f"{prog or 'mm'}: note: {note}")
    return Runtime(config=config, accelerator=accelerator, launch=launch)
