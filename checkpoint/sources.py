"""Where mm-convert reads a DiT from, one tensor at a time.

Every source answers the same questions in the vocabulary of its model family's ``NameTable`` (the
Wan DiT's, Open-Sora-Plan's ...): which global mm keys it holds
(``blocks.{global i}.…``), and for one key the full, unsplit tensors of its parts (one part, or
q/k/v of a fused row, in the table's order). Nothing is read before it is asked for: safetensors
files are read tensor by tensor with positioned reads, torch files are opened with ``mmap=True``,
torch_dist checkpoints load one tensor per request.

Nothing is trusted that a file's own header does not account for: a safetensors header whose
tensors lie past the file's end (a truncated download), or a read that returns fewer bytes than
the header promises, is a SourceDataError naming the file and the tensor; an mm checkpoint is
verified (``mm.ckpt.verify_checkpoint``: its manifest, its format's file list) before it is read,
and a rank file or tensor that cannot be read is a DamagedCheckpointError naming it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from checkpoint.config import ConvertError, SourceDataError
from mm.ckpt import (
    DIST_INDEX,
    MODEL_FILE,
    TRACKER,
    CheckpointError,
    CheckpointHeader,
    DamagedCheckpointError,
    chunk_keys,
    failure_reason,
    find_checkpoint,
    load_torch_file,
    rank_dir,
    verify_checkpoint,
)
from mm.models.predictor.name_table import (
    NameTable,
    ReleaseConfigError,
    WeightMappingError,
    global_name,
    tp_merge,
    tp_split,
)
from mm.models.predictor.lora import ADAPTER_KEY, merged
from mm.models.release_file import UnreadableFile, read_state_dict, read_torch_file

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _is_block_rule(template: str) -> bool:
    return template.startswith("blocks.{i}.")


class Source:
    """The interface; ``weights``: the model family; ``arch``: its predictor config keys (what
    checkpoint headers record as ``extra.predictor``); ``origin``: a phrase for messages."""

    weights: NameTable
    arch: dict[str, Any]
    origin: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def parts(self, key: str) -> list[torch.Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        """Unmap what was read so far (the writers call it after each output file, so the pages of
        memory-mapped inputs do not pile up in the process's resident memory)."""

    def local(self, key: str, tp: int, rank: int) -> torch.Tensor:
        """TP rank ``rank``'s tensor of ``key`` (fused rows: the rank's slice of each part, concatenated)."""
        rule, _ = self.weights.rule_for(key)
        try:
            return tp_split(self.parts(key), rule.split, tp, rank, key)
        except WeightMappingError as e:
            raise ConvertError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# HuggingFace: a directory of *.safetensors files and config.json (diffusers' sharded layout with
# its index, or a release's single file)


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFile:
    """One ``.safetensors`` file read with plain positioned reads (no memory map): a tensor, or a
    range of its rows, costs exactly its bytes of memory, and nothing stays mapped afterwards.

    Opening checks the header against the file: every tensor's byte range must hold its dtype and
    shape and lie inside the file (SourceDataError naming the file and the tensor otherwise); every
    read must return all the bytes asked for."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SourceDataError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
            (length,) = struct.unpack("<Q", prefix)
            if 8 + length > size:
                raise SourceDataError(f"{path}: its header says it is {length} bytes long, but the file has only "
                                      f"{size} bytes (truncated, or not a safetensors file)")
            raw = f.read(length)
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise SourceDataError(f"{path}: its header is not valid JSON ({e}); the file is corrupt") from None
        if not isinstance(header, dict):
            raise SourceDataError(f"{path}: its header is a JSON {type(header).__name__}, not an object of tensors")
        header.pop("__metadata__", None)
        self._base = 8 + length
        self.entries = header
        for name in header:
            self._check(name, size)

    def _check(self, name: str, size: int) -> None:
        """Tensor ``name``'s entry: a dtype mm-convert reads, a byte range of exactly its size that
        lies inside the file."""
        entry = self.entries[name]
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SourceDataError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if dtype not in _DTYPES:
            raise ConvertError(f"{self.path}: tensor {name!r} has dtype {dtype!r}; mm-convert reads "
                               f"{', '.join(_DTYPES)}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or end - begin != nbytes:
            raise SourceDataError(f"{self.path}: tensor {name!r}: data_offsets [{begin}, {end}) do not hold its "
                                  f"{dtype} {shape} ({nbytes} bytes); the header is corrupt")
        if self._base + end > size:
            raise SourceDataError(f"{self.path}: tensor {name!r} lies at bytes [{self._base + begin}, "
                                  f"{self._base + end}), past the file's end at {size} bytes (truncated)")

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name]["shape"])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows ``[start, stop)`` of its first dimension."""
        entry = self.entries[name]
        dtype = _DTYPES[entry["dtype"]]
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        buffer = bytearray(end - begin)
        view, got = memoryview(buffer), 0
        with open(self.path, "rb") as f:
            f.seek(self._base + begin)
            while got < len(buffer):
                n = f.readinto(view[got:])
                if not n:
                    raise SourceDataError(f"{self.path}: tensor {name!r}: read {got} of its {len(buffer)} bytes at "
                                          f"byte {self._base + begin}; the file ended early (truncated while being "
                                          "read?)")
                got += n
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class TorchStateFile:
    """A torch state-dict file (``{name: tensor}`` saved by ``torch.save``, e.g. Phantom-Wan-1.3B.pth),
    memory-mapped and read without running pickled code, behind SafetensorsFile's interface."""

    def __init__(self, path: Path, option: str = "--cfg.source_path"):
        self.path = path
        try:
            self.state = read_state_dict(path, option)
        except UnreadableFile as e:
            raise SourceDataError(str(e)) from None
        except ValueError as e:
            raise ConvertError(str(e)) from None

    def keys(self):
        return self.state.keys()

    def shape(self, name: str) -> list[int]:
        return list(self.state[name].shape)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.state[name]
        return (tensor if rows is None else tensor[rows[0]:rows[1]]).clone()


class HFSource(Source):
    """``*.safetensors`` (diffusers' sharded files with their index, or a release's single file) and
    ``config.json`` in one directory, named as one of ``weights``' formats; or one weights file (a
    ``.safetensors``, or a ``.pth``/``.pt`` state dict such as Phantom's) with the config.json
    ``config`` names (default: the one beside the file)."""

    def __init__(self, directory: str | Path, weights: NameTable, option: str = "--cfg.source_path",
                 config: str | Path | None = None):
        self.weights = weights
        self.directory = Path(directory)
        self.config_file = Path(config) if config is not None else None
        if self.directory.is_file() and self.directory.suffix in (".safetensors", ".pth", ".pt"):
            files = [self.directory]
            if self.config_file is None:
                self.config_file = self.directory.parent / "config.json"
        elif not self.directory.is_dir():
            raise ConvertError(f"{option} = {str(directory)!r}: not a directory, nor a .safetensors / .pth / .pt "
                               "weights file")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{option} = {str(directory)!r}: no *.safetensors files there (expected the "
                               f"{weights.model}'s release directory: config.json and *.safetensors)")
        self._file_of: dict[str, SafetensorsFile | TorchStateFile] = {}
        for f in files:
            try:
                handle = TorchStateFile(f) if f.suffix in (".pth", ".pt") else SafetensorsFile(f)
            except OSError as e:
                raise SourceDataError(f"{option}: cannot read {f}: {e}") from None
            for key in handle.keys():
                if key in self._file_of:
                    raise ConvertError(f"{option}: tensor {key!r} is in more than one file ({f.name})")
                self._file_of[key] = handle
        try:
            self.format = weights.detect_format(self._file_of)
        except WeightMappingError as e:
            raise ConvertError(f"{option} = {str(directory)!r}: {e}") from None
        self.origin = f"{self.format} weights in {self.directory}"
        self.arch = self._read_arch(option)
        self._keys = self._map_keys()

    def _shape(self, name: str) -> list[int]:
        return self._file_of[name].shape(name)

    def _read_arch(self, option: str) -> dict[str, Any]:
        config_file = self.config_file or self.directory / "config.json"
        if not config_file.is_file():
            where = f"--cfg.source_config = {str(config_file)!r}: not a file" if self.config_file is not None else \
                f"{option} = {str(self.directory)!r}: no config.json"
            raise ConvertError(f"{where} (the release's config.json gives the number of attention heads, which the "
                               "weights do not; for a weights file such as Phantom's .pth, the base model's, e.g. "
                               "--cfg.source_config ./Wan2.1-T2V-1.3B/config.json)")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as e:
            raise ConvertError(f"{config_file}: not JSON: {e}") from None
        self.hf_config = config

        def shape(name: str) -> list[int] | None:
            return self._shape(name) if name in self._file_of else None

        try:
            return self.weights.read_arch(config, self.format, shape, str(config_file))
        except ReleaseConfigError as e:
            raise ConvertError(str(e)) from None

    def _map_keys(self) -> list[str]:
        """Every table row whose source tensors are all present (a row's parts all or none), and
        the check that nothing is left over and the layer count is the config's."""
        keys, used, partial = [], set(), []
        block = self.weights.source_layer_pattern(self.format)
        layers = sorted({int(m.group(1)) for k in self._file_of if (m := block.match(k))})
        for rule in self.weights.rows:
            indices = layers if _is_block_rule(rule.mm) else [None]
            for i in indices:
                values = {} if i is None else {"i": str(i)}
                names = [s.format(**values) for s in rule.sources(self.format)]
                present = [n for n in names if n in self._file_of]
                if len(present) == len(names):
                    keys.append(rule.mm.format(**values))
                    used.update(names)
                elif present:
                    partial.append(f"{rule.mm.format(**values)} needs {names}, found only {present}")
        ignored = self.weights.ignored.get(self.format, ())
        unexpected = sorted(k for k in self._file_of if k not in used and not any(p.match(k) for p in ignored))
        problems = []
        if partial:
            problems.append(f"incomplete ({len(partial)}): {'; '.join(partial[:10])}")
        if unexpected:
            problems.append(f"not in the {self.weights.model} name table ({len(unexpected)}): "
                            f"{', '.join(unexpected[:20])}")
        if self.weights.expected_keys is not None:
            expected = self.weights.expected_keys(self.arch)
            missing = [k for k in expected if k not in set(keys)]
            if missing:
                names = [n for k in missing for n in self._names(k)]
                problems.append(f"missing ({len(names)}): {', '.join(names[:20])}")
            surplus = sorted(set(keys) - set(expected))
            if surplus:
                names = [n for k in surplus for n in self._names(k)]
                problems.append(f"not part of the model config.json describes ({len(names)}): {', '.join(names[:20])}")
        if layers != list(range(self.arch["num_layers"])):
            problems.append(f"layers {layers[:3]}...{layers[-3:] if layers else []} ({len(layers)}) but config.json "
                            f"says num_layers = {self.arch['num_layers']}")
        if problems:
            raise ConvertError(f"{self.origin} do not match the {self.weights.model}:\n  " + "\n  ".join(problems))
        return keys

    def keys(self) -> list[str]:
        return list(self._keys)

    def _names(self, key: str) -> list[str]:
        rule, values = self.weights.rule_for(key)
        return [s.format(**values) for s in rule.sources(self.format)]

    def parts(self, key: str) -> list[torch.Tensor]:
        return [self._file_of[n].read(n) for n in self._names(key)]

    def local(self, key: str, tp: int, rank: int) -> torch.Tensor:
        """Reads only the rank's rows of a column-split tensor (a row-split one is read whole and cut)."""
        rule, _ = self.weights.rule_for(key)
        if rule.split != "column" or tp == 1:
            return super().local(key, tp, rank)
        pieces = []
        for name in self._names(key):
            rows = self._shape(name)[0]
            if rows % tp:
                raise ConvertError(f"{name}: dim 0 of shape {tuple(self._shape(name))} does not split over TP {tp}")
            n = rows // tp
            pieces.append(self._file_of[name].read(name, (rank * n, (rank + 1) * n)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


# ---------------------------------------------------------------------------------------------
# mm checkpoints: the torch format (per-rank files) and torch_dist


def _checkpoint_path(root: Path, option: str) -> Path:
    try:
        path = find_checkpoint(root, option)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if path is None:
        hint = ("; it holds *.safetensors and config.json, a HuggingFace-side release: convert that with hf_to_mm"
                if (root / "config.json").is_file() and any(root.glob("*.safetensors")) else "")
        raise ConvertError(f"{option} = {str(root)!r}: no {TRACKER} (pass the directory that --save wrote or "
                           f"mm-convert hf_to_mm made){hint}")
    return path


def _header(path: Path, option: str) -> CheckpointHeader:
    """The header of ``path``, verified first (a damaged checkpoint stays a DamagedCheckpointError)."""
    try:
        header = verify_checkpoint(path, option)
    except DamagedCheckpointError:
        raise
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if not header.predictor:
        raise ConvertError(f"{option}: {path} does not record the model's predictor config (extra.predictor); it was "
                           "written by an mm without it")
    return header


def open_mm_source(directory: str | Path, weights: NameTable, option: str = "--cfg.source_path") -> Source:
    """An mm checkpoint directory (the one with latest_checkpointed_iteration.txt), either format, of
    ``weights``' model."""
    root = Path(directory)
    if not root.is_dir():
        raise ConvertError(f"{option} = {str(directory)!r}: not a directory")
    path = _checkpoint_path(root, option)
    header = _header(path, option)
    source = (TorchSource if header.format == "torch" else TorchDistSource)(path, header, weights)
    _check_keys(source, option)
    return source


class TorchSource(Source):
    """``mp_rank_XX[_YYY]/model_optim_rng.pt`` of any TP/PP/VPP, opened memory-mapped."""

    def __init__(self, path: Path, header: CheckpointHeader, weights: NameTable):
        self.weights = weights
        self.path = path
        self.header = header
        self.arch = dict(header.predictor)
        parallel = header.parallel
        self.tp, self.pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        chunks = parallel.virtual_pipeline_model_parallel_size or 1
        self.chunk_keys = chunk_keys(chunks)
        self.origin = f"the mm checkpoint {path} (TP{self.tp} PP{self.pp}{f' VPP{chunks}' if chunks > 1 else ''})"
        self._files: dict[tuple[int, int], dict] = {}
        # global key -> (stage, chunk key, local key); layer offsets follow megatron's chunk-major order
        counts = {}
        for stage in range(self.pp):
            model = self._file(0, stage)
            for ck in self.chunk_keys:
                counts[(stage, ck)] = len({int(m.group(1)) for k in model[ck] if (m := _BLOCK.match(k))})
        self._where: dict[str, tuple[int, str, str]] = {}
        offset = 0
        for ck in self.chunk_keys:
            for stage in range(self.pp):
                for local in self._file(0, stage)[ck]:
                    if local.endswith("._extra_state"):
                        continue
                    self._where[global_name(local, offset)] = (stage, ck, local)
                offset += counts[(stage, ck)]

    def _file(self, tp_rank: int, stage: int) -> dict:
        if (tp_rank, stage) not in self._files:
            f = rank_dir(self.path, tp_rank, stage, self.pp) / MODEL_FILE
            if not f.is_file():
                raise ConvertError(f"{self.origin}: {f} is missing")
            self._files[(tp_rank, stage)] = load_torch_file(f, self.origin, mmap=True, weights_only=False)
        return self._files[(tp_rank, stage)]

    def release(self) -> None:
        self._files.clear()

    def keys(self) -> list[str]:
        return list(self._where)

    def parts(self, key: str) -> list[torch.Tensor]:
        rule, _ = self.weights.rule_for(key)
        stage, ck, local = self._where[key]
        return tp_merge([self._file(r, stage)[ck][local] for r in range(self.tp)], rule.split, rule.fused_parts)


class TorchDistSource(Source):
    """A torch_dist checkpoint: tensors stored under global keys with un-split shapes (fused rows as
    ``[parts, ...]``), read one at a time without process groups."""

    def __init__(self, path: Path, header: CheckpointHeader, weights: NameTable):
        from torch.distributed.checkpoint import FileSystemReader

        self.weights = weights
        self.path = path
        self.header = header
        self.arch = dict(header.predictor)
        self.origin = f"the mm checkpoint {path} (torch_dist)"
        self._reader = FileSystemReader(str(path))
        try:
            metadata = self._reader.read_metadata().state_dict_metadata
        except Exception as e:  # noqa: BLE001 -- a truncated or overwritten pickle
            raise DamagedCheckpointError(f"{self.origin}: cannot read {path / DIST_INDEX}: {failure_reason(e)}") \
                from None
        self._meta = {}
        self.unmatched: list[str] = []  # tensors of the checkpoint without a row in the name table
        for key, meta in metadata.items():
            if key.startswith(("optimizer.", "ema.", "rng_state", "common")) or not hasattr(meta, "size"):
                continue
            try:
                weights.rule_for(key)
            except WeightMappingError:
                self.unmatched.append(key)
                continue
            self._meta[key] = meta

    def keys(self) -> list[str]:
        return list(self._meta)

    def parts(self, key: str) -> list[torch.Tensor]:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.api import CheckpointException

        meta = self._meta[key]
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        try:
            load({key: tensor}, storage_reader=self._reader, no_dist=True)
        except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
            raise DamagedCheckpointError(f"{self.origin}: cannot read tensor {key}: {failure_reason(e)}") from None
        rule, _ = self.weights.rule_for(key)
        return list(tensor.unbind(0)) if rule.fused_parts > 1 else [tensor]


def open_adapters(directory: str | Path, weights: NameTable, option: str = "--cfg.lora_path") -> Source:
    """A LoRA run's adapter checkpoint (its header records the adapters; any format and split)."""
    source = open_mm_source(directory, weights, option)
    if source.header.lora is None:
        raise ConvertError(f"{option} = {str(directory)!r}: {source.origin} holds whole weights, no LoRA adapters "
                           "(give a LoRA run's --save directory)")
    return source


def refuse_adapters(source: Source, option: str = "--cfg.source_path") -> None:
    """Whole weights are asked for: an adapter checkpoint is named with what to do instead."""
    if getattr(source, "header", None) is not None and source.header.lora is not None:
        raise ConvertError(f"{option}: {source.origin} holds LoRA adapters alone, no base weights; merge them into the "
                           "base with mm_to_hf --cfg.source_path <base> --cfg.lora_path <this>, or write them for "
                           "diffusers with lora_to_hf")


class MergedSource(Source):
    """A base source with a LoRA run's adapters merged into its linears' weights: every part ``p``
    with an adapter becomes ``W_p + scale * alpha / r * B_p @ A_p`` (full, unsplit tensors)."""

    def __init__(self, base: Source, adapters: Source, scale: float):
        self.weights, self.arch, self.base, self.adapters = base.weights, base.arch, base, adapters
        lora = adapters.header.lora
        self.scale = scale * float(lora["alpha"]) / int(lora["r"])
        self.origin = f"{base.origin} with the adapters of {adapters.origin}"
        self._adapted: dict[str, dict[int, tuple[str, str]]] = {}
        for key in adapters.keys():
            match = ADAPTER_KEY.match(key)
            if match is None or match["matrix"] != "A":
                continue
            linear, part = match["linear"], int(match["part"])
            self._adapted.setdefault(f"{linear}.weight", {})[part] = (key, f"{linear}.lora_B.{part}")
        keys = set(base.keys())
        missing = sorted(k for k in self._adapted if k not in keys)
        if missing:
            raise ConvertError(f"--cfg.lora_path: {adapters.origin} adapts linears {base.origin} does not have: "
                               f"{', '.join(missing[:10])}")

    def keys(self) -> list[str]:
        return self.base.keys()

    def parts(self, key: str) -> list[torch.Tensor]:
        parts = self.base.parts(key)
        if key not in self._adapted:
            return parts
        pairs = {p: (self.adapters.parts(a)[0], self.adapters.parts(b)[0]) for p, (a, b) in self._adapted[key].items()}
        for p, (a, b) in pairs.items():
            if b.shape[0] != parts[p].shape[0] or a.shape[1] != parts[p].shape[1]:
                raise ConvertError(f"--cfg.lora_path: {key} part {p} is {tuple(parts[p].shape)}, its adapter B @ A "
                                   f"{tuple(b.shape)} @ {tuple(a.shape)}: not the model the adapters were trained on")
        return merged(parts, pairs, self.scale)

    def release(self) -> None:
        self.base.release()
        self.adapters.release()


def _check_keys(source: Source, option: str) -> None:
    """Every model tensor of an mm checkpoint must have a row in the converter's name table (a Wan
    checkpoint given to the Open-Sora-Plan converter fails here, naming the tensors)."""
    unknown = list(getattr(source, "unmatched", []))
    for key in source.keys():
        try:
            source.weights.rule_for(key)
        except WeightMappingError:
            unknown.append(key)
    if unknown or not source.keys():
        raise ConvertError(f"{option}: {source.origin} is not a {source.weights.model} checkpoint: "
                           f"{len(unknown)} tensors have no row in its name table: {', '.join(unknown[:10])}")


def iter_layer_keys(keys: list[str], first: int, count: int) -> Iterator[str]:
    for key in keys:
        m = _BLOCK.match(key)
        if m and first <= int(m.group(1)) < first + count:
            yield key


def read_torch_state(path: str | Path, option: str = "--cfg.source_path") -> dict:
    """A release's torch file (a state dict or a training checkpoint: a dict), memory-mapped where the format
    allows and unpickled without running code (``mm.models.release_file``). Pickled objects or not a dict:
    ConvertError; truncated, corrupt or not a torch file: SourceDataError; both name ``option`` and the path."""
    try:
        checkpoint = read_torch_file(path, option)
    except UnreadableFile as e:
        raise SourceDataError(str(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise ConvertError(str(e)) from None
    if not isinstance(checkpoint, dict):
        raise ConvertError(f"{option} = {str(path)!r} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint
