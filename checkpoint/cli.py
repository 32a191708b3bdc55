"""``mm-convert <Converter> --version <v> <verb> --cfg.source_path ... --cfg.target_path ...``

Exit codes: 0 done; 2 options or inputs that do not fit them (ConvertError); 1 a damaged input (a
truncated or corrupt file, SourceDataError / mm.ckpt's CheckpointError) or a failed read or write
(OSError). Either failure prints one ``mm-convert: error: ...`` message and leaves no target
(``writers.staged_target``)."""

from __future__ import annotations

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core/diffusers are imported: their known notices (MM_VERBOSE=1 shows them)

import sys
from typing import Sequence

from checkpoint.config import ConvertError, SourceDataError
from mm.ckpt import CheckpointError
from mm.families import families


def converters() -> dict[str, type]:
    """Every registered family's converter, by class name (``mm-convert <name> ...``)."""
    found = [spec.converter() for spec in families() if spec.converter is not None]
    return {cls.__name__: cls for cls in found}


def main(argv: Sequence[str] | None = None) -> None:
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        CLI(converters(), args=argv, prog="mm-convert", as_positional=False,
            description="Convert DiT (and VAE, text encoder) weights between HuggingFace-side releases and mm's "
                        "TP/PP/VPP checkpoints.")
    except ConvertError as e:  # options, or inputs that do not fit them: exit code 2, as for bad flags
        print(f"mm-convert: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (SourceDataError, CheckpointError, OSError) as e:  # damaged input, a failed read or write: 1
        print(f"mm-convert: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
