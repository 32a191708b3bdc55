"""mm's checkpoint format, below the training loop, inference and mm-convert alike: the directory
layout (tracker, iteration and rank directories, ``layout.py``), the versioned header
(``header.py``), the per-chunk keys (``chunks.py``), the manifest and the checks before a load
(``integrity.py``) and loading model weights into model chunks (``load.py``). Saving with
optimizer, RNG and EMA is the training loop's (``mm.training.checkpointing``); writing converted
weights is mm-convert's (``checkpoint/``).
"""

from mm.ckpt.chunks import chunk_keys, unwrap
from mm.ckpt.header import (
    CHECKPOINT_VERSION,
    MODEL_PARALLEL,
    CheckpointHeader,
    Content,
    ParallelLayout,
    read_header,
    write_header,
)
from mm.ckpt.integrity import MANIFEST, load_torch_file, verify_checkpoint, write_manifest
from mm.ckpt.layout import (
    CKPT_FORMATS,
    DIST_INDEX,
    HEADER_FILE,
    MEGATRON_CHECKPOINT_VERSION,
    MODEL_FILE,
    OPTIM_FILE,
    RELEASE,
    TRACKER,
    CheckpointError,
    DamagedCheckpointError,
    checkpoint_dir,
    checkpoint_format,
    failure_reason,
    find_checkpoint,
    list_checkpoints,
    rank_dir,
    read_tracker,
    write_tracker,
)
from mm.ckpt.load import load_model

__all__ = [
    "CHECKPOINT_VERSION",
    "CKPT_FORMATS",
    "DIST_INDEX",
    "HEADER_FILE",
    "MANIFEST",
    "MEGATRON_CHECKPOINT_VERSION",
    "MODEL_FILE",
    "MODEL_PARALLEL",
    "OPTIM_FILE",
    "RELEASE",
    "TRACKER",
    "CheckpointError",
    "CheckpointHeader",
    "Content",
    "DamagedCheckpointError",
    "ParallelLayout",
    "checkpoint_dir",
    "checkpoint_format",
    "chunk_keys",
    "failure_reason",
    "find_checkpoint",
    "list_checkpoints",
    "load_model",
    "load_torch_file",
    "rank_dir",
    "read_header",
    "read_tracker",
    "unwrap",
    "verify_checkpoint",
    "write_header",
    "write_manifest",
    "write_tracker",
]
