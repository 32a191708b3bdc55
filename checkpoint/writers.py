"""What mm-convert writes: mm checkpoints in the torch format (``release``, with the manifest of
``mm.ckpt.integrity``), HuggingFace-style directories (config.json + safetensors) and single files;
all into a temporary path beside the target, renamed into place at the end (a failure leaves no
target). Every file gets the mode ``open()`` gives it (0666 less the umask)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from checkpoint.config import ConvertError, Layout
from checkpoint.sources import Source, iter_layer_keys
from mm.ckpt import (
    MEGATRON_CHECKPOINT_VERSION,
    MODEL_FILE,
    RELEASE,
    CheckpointHeader,
    Content,
    ParallelLayout,
    checkpoint_dir,
    chunk_keys,
    rank_dir,
    write_header,
    write_manifest,
    write_tracker,
)


@contextmanager
def staged_target(target: str | Path, overwrite: bool, option: str = "--cfg.target_path") -> Iterator[Path]:
    """A fresh temporary directory that becomes ``target`` when the block finishes; on failure it is
    removed and ``target`` is untouched."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConvertError(f"{option} = {str(target)!r} exists; pass --cfg.overwrite true to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    if target.exists():
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


@contextmanager
def staged_file(target: str | Path, overwrite: bool, option: str = "--cfg.target_path") -> Iterator[Path]:
    """A temporary file name beside ``target`` that becomes ``target`` when the block finishes; on
    failure it is removed and ``target`` is untouched."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConvertError(f"{option} = {str(target)!r} exists; pass --cfg.overwrite true to replace it")
    if target.is_dir():
        raise ConvertError(f"{option} = {str(target)!r} is a directory; give a file name (e.g. vae.pt)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` owning exactly its bytes: a view (of a whole tensor read for one TP slice) would
    keep, and torch.save would write, the whole storage."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def return_freed_memory_to_the_system() -> None:
    """glibc keeps freed blocks of a few MiB in its heap once its adaptive mmap threshold has risen
    (after a larger block was freed), so a converter that reads and frees tensor after tensor grows
    towards the model's size. A fixed 1 MiB threshold (which also turns the adaptation off) makes
    every tensor-sized block its own mapping, returned on free. Linux/glibc only; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _stage_keys(layout: Layout, source: Source, source_keys: list[str], stage: int,
                chunk: int) -> list[tuple[str, str]]:
    """(global key, local key) of one stage's chunk: its layers (local indices from 0), the
    embedders on the first, the head on the last."""
    first, count = layout.span(stage, chunk)
    out = []
    for key in source_keys:
        if key.startswith("blocks."):
            continue
        head = source.weights.is_head(key)
        if (head and layout.holds_head(stage, chunk)) or (not head and layout.holds_embedders(stage, chunk)):
            out.append((key, key))
    for key in iter_layer_keys(source_keys, first, count):
        index, rest = key[len("blocks."):].split(".", 1)
        out.append((key, f"blocks.{int(index) - first}.{rest}"))
    return out


def write_mm(source: Source, layout: Layout, directory: Path, extra: dict[str, Any]) -> int:
    """An mm ``release`` checkpoint of ``source`` split by ``layout`` under ``directory``; one
    (TP, PP) file at a time; ``extra``: the header's notes on where it came from. Returns the bytes
    written."""
    keys = source.keys()
    release = checkpoint_dir(directory, RELEASE)
    release.mkdir()
    chunks = len(layout.rows)
    chunk_names = chunk_keys(chunks)
    plan = [(stage, rank) for stage in range(layout.pp) for rank in range(layout.tp)]
    tensors = layout.tp * sum(len(_stage_keys(layout, source, keys, s, c)) for s in range(layout.pp)
                              for c in range(chunks))
    total = 0
    with tqdm(total=tensors, desc=extra.get("verb", "convert"), unit="tensor") as bar:
        for stage, rank in plan:
            state: dict[str, Any] = {"checkpoint_version": MEGATRON_CHECKPOINT_VERSION, "iteration": 0}
            for chunk, name in enumerate(chunk_names):
                state[name] = {}
                for gkey, local in _stage_keys(layout, source, keys, stage, chunk):
                    tensor = compact(source.local(gkey, layout.tp, rank))
                    state[name][local] = tensor
                    total += tensor.numel() * tensor.element_size()
                    bar.update()
            out = rank_dir(release, rank, stage, layout.pp)
            out.mkdir()
            with open(out / MODEL_FILE, "wb") as f:
                torch.save(state, f)
            del state
            source.release()
    parallel = ParallelLayout(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                              virtual_pipeline_model_parallel_size=layout.vpp, world_size=layout.tp * layout.pp)
    write_header(release, CheckpointHeader(iteration=0, consumed_samples=0, parallel=parallel, content=Content(),
                                           entry_point="mm-convert", predictor=source.arch,
                                           pipeline_layers=layout.as_pp_layers(), extra=extra, format="torch"))
    write_manifest(release)
    write_tracker(directory, RELEASE)
    return total


def write_hf(source: Source, directory: Path, max_shard_bytes: int) -> int:
    """A HuggingFace-style directory of the model's ``hf_format`` (for Wan a diffusers
    ``WanTransformer3DModel``): config.json and safetensors files of at most ``max_shard_bytes``
    (several: ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` and the index). Returns the
    bytes written."""
    from safetensors.torch import save_file

    files: list[tuple[str, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(files):05d}.safetensors"
            save_file(current, str(directory / name), metadata={"format": "pt"})
            default_mode(directory / name)
            files.append((name, list(current)))
            current, size = {}, 0
            source.release()

    weights = source.weights
    for key in tqdm(source.keys(), desc="mm_to_hf", unit="tensor"):
        rule, values = weights.rule_for(key)
        names = [s.format(**values) for s in rule.sources(weights.hf_format)]
        for name, tensor in zip(names, source.parts(key)):
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = compact(tensor)
            size += nbytes
            total += nbytes
    flush()
    source.release()
    if len(files) == 1:
        (directory / files[0][0]).rename(directory / "diffusion_pytorch_model.safetensors")
    else:
        weight_map = {}
        for i, (name, keys) in enumerate(files, start=1):
            final = f"diffusion_pytorch_model-{i:05d}-of-{len(files):05d}.safetensors"
            (directory / name).rename(directory / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(weights.hf_config(source.arch), indent=2) + "\n")
    return total


# diffusers' file and metadata names for a LoRA (``load_lora_weights(directory)`` reads the file; the metadata,
# JSON under this key with the pipeline component's prefix, gives peft's LoraConfig: rank, alpha, targets)
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"
LORA_COMPONENT = "transformer"


def write_lora(source: Source, directory: Path, scale: float = 1.0) -> int:
    """A LoRA run's adapters (``source``: its checkpoint, whose header records them) as the PEFT /
    diffusers LoRA file ``directory/pytorch_lora_weights.safetensors``: ``transformer.<module>.lora_A.weight``
    ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` in the family's HuggingFace-side names (diffusers' for Wan:
    ``transformer.blocks.0.attn1.to_q.lora_A.weight``), with the adapter config (r, lora_alpha = alpha x
    ``scale``, target_modules) in the file's metadata. Returns the bytes written."""
    from safetensors.torch import save_file

    weights, lora = source.weights, source.header.lora
    tensors: dict[str, torch.Tensor] = {}
    for key in tqdm(source.keys(), desc="lora_to_hf", unit="tensor"):
        rule, values = weights.rule_for(key)
        (name,) = [s.format(**values) for s in rule.sources(weights.hf_format)]
        tensors[f"{LORA_COMPONENT}.{name}"] = compact(source.parts(key)[0]).contiguous()
    modules = sorted({name[len(LORA_COMPONENT) + 1:].rsplit(".lora_", 1)[0] for name in tensors})
    config = {f"{LORA_COMPONENT}.r": int(lora["r"]), f"{LORA_COMPONENT}.lora_alpha": float(lora["alpha"]) * scale,
              f"{LORA_COMPONENT}.target_modules": modules}
    save_file(tensors, str(directory / LORA_FILE),
              metadata={"format": "pt", LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})
    default_mode(directory / LORA_FILE)
    source.release()
    return sum(t.numel() * t.element_size() for t in tensors.values())


def open_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def default_mode(path: str | Path) -> None:
    """Give ``path`` the mode ``open()`` gives a new file: the safetensors library creates its files 0600."""
    os.chmod(path, open_mode())


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_modes(directory: Path) -> None:
    """Give every file under ``directory`` the mode ``open()`` gives (0666 less the umask): libraries
    that write them (safetensors) create theirs 0600."""
    for root, _, names in os.walk(directory):
        for name in names:
            os.chmod(os.path.join(root, name), open_mode())


def fsync_tree(directory: Path) -> None:
    for root, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
