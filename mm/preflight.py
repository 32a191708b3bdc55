"""The pre-flight check: an entry point's configuration validated once, before torchrun starts anything.

    python -m mm.preflight [torchrun's options] ENTRY_POINT [the entry point's flags]

takes the command line of a torchrun launch without the word ``torchrun`` and runs what the entry
point (``pretrain_t2v.py``, ``pretrain_i2v.py``, ``pretrain_vae.py``, ``extract_features.py`` or
``inference.py``) runs in each process before any
process group exists (``mm.runtime.configure_or_exit`` with the entry point's own checks: flags, model
and data JSONs, the files they name, the output directories, --load), for the world size the launch will
have: ``--nproc_per_node`` x ``--nnodes``. A bad configuration prints ``<entry point>: error: ...`` with
one line per problem, once, and exits with code 2; a good one prints one line and exits 0. Nothing is
started. The launch scripts in examples/ run it before torchrun (``MM_PREFLIGHT=0`` skips it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

PROG = "mm.preflight"
# torchrun's options without a value; every other option before the entry point takes one
_NO_VALUE = {"--standalone", "--no-python", "--run-path", "--module", "-m"}


def _entry_points() -> dict[str, Callable[[], object]]:
    from mm.inference.runner import entry_point as inference_entry
    from mm.training.pretrain import entry_point as pretrain_entry
    from mm.training.extract_features import entry_point as features_entry
    from mm.training.pretrain_vae import entry_point as vae_entry

    return {"pretrain_t2v.py": lambda: pretrain_entry("t2v"), "pretrain_i2v.py": lambda: pretrain_entry("i2v"),
            "inference.py": inference_entry, "pretrain_vae.py": vae_entry, "extract_features.py": features_entry}


def _fail(message: str) -> SystemExit:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


def split_launch(argv: Sequence[str]) -> tuple[dict[str, str], str, list[str]]:
    """torchrun's options (``--name`` -> value, with ``-`` for ``_``; ``--standalone`` -> ""), the
    entry point and its flags."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        key = name.replace("_", "-")
        if eq:
            options[key] = value
            i += 1
        elif key in _NO_VALUE:
            options[key] = ""
            i += 1
        else:
            if i + 1 >= len(argv):
                raise _fail(f"torchrun option {arg} without a value")
            options[key] = argv[i + 1]
            i += 2
    if i >= len(argv):
        raise _fail("no entry point (pretrain_t2v.py, pretrain_i2v.py, pretrain_vae.py, extract_features.py or inference.py) after torchrun's options")
    return options, argv[i], list(argv[i + 1:])


def launch_world_size(options: dict[str, str]) -> int:
    """--nproc_per_node x --nnodes (the largest node count of a MIN:MAX range); torchrun's defaults: 1."""
    sizes = []
    for key in ("--nproc-per-node", "--nnodes"):
        raw = options.get(key, "1")
        value = raw.rpartition(":")[2] if key == "--nnodes" else raw
        if not value.isdigit() or int(value) < 1:
            raise _fail(f"torchrun {key} {raw}: the pre-flight check needs a number of processes "
                        f"(MM_PREFLIGHT=0 skips it)")
        sizes.append(int(value))
    return sizes[0] * sizes[1]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    options, script, flags = split_launch(argv)
    entries = _entry_points()
    if Path(script).name not in entries:
        raise _fail(f"{script} is not an mm entry point; valid: {', '.join(entries)}")
    world_size = launch_world_size(options)
    entry = entries[Path(script).name]()

    from mm.runtime import configure_or_exit

    config, accelerator, _ = configure_or_exit(flags, entry, world_size=world_size)
    sizes = config.sizes
    print(f"{PROG}: {entry.prog}: configuration valid for {world_size} process(es) on {accelerator.name}: "
          f"TP={sizes.tensor_parallel} PP={sizes.pipeline_parallel} VPP={config.virtual_pipeline_size or 1} "
          f"CP={sizes.context_parallel} DP={sizes.data_parallel}", flush=True)
    return 0


if __name__ == "__main__":
    from mm.accelerator.notices import quiet_known_notices

    quiet_known_notices()
    sys.exit(main())
