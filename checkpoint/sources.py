"""Where mm-convert reads a Wan DiT from, one tensor at a time.

Every source answers the same questions in the vocabulary of the Wan name table
(``mm.models.predictor.wan.weights``): which global mm keys it holds (``blocks.{global i}.…``),
and for one key the full, unsplit tensors of its parts (one part, or q/k/v of a fused row, in
the table's order). Nothing is read before it is asked for: safetensors files are memory-mapped,
torch files are opened with ``mmap=True``, torch_dist checkpoints load one tensor per request.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from checkpoint.config import ConvertError
from mm.training.chunks import chunk_keys
from mm.models.predictor.wan.weights import (
    IGNORED_SOURCE_KEYS,
    WAN_NAME_TABLE,
    WeightMappingError,
    detect_format,
    global_name,
    rule_for,
    tp_shard,
)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _is_block_rule(template: str) -> bool:
    return template.startswith("blocks.{i}.")


class Source:
    """The interface; ``arch``: the model's WanDiTConfig keys; ``origin``: a phrase for messages."""

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
        rule, _ = rule_for(key)
        pieces = [_split(p, rule.split, tp, rank, key) for p in self.parts(key)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _split(tensor: torch.Tensor, split: str | None, tp: int, rank: int, key: str) -> torch.Tensor:
    try:
        return tp_shard(tensor, split, tp, rank, key)
    except WeightMappingError as e:
        raise ConvertError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# HuggingFace: a diffusers WanTransformer3DModel directory or the original Wan release


def arch_from_diffusers(config: dict) -> dict[str, Any]:
    heads = config["num_attention_heads"]
    arch = dict(num_layers=config["num_layers"], num_heads=heads, hidden_size=heads * config["attention_head_dim"],
                ffn_dim=config["ffn_dim"], in_dim=config["in_channels"], out_dim=config["out_channels"],
                patch_size=list(config.get("patch_size", [1, 2, 2])), freq_dim=config.get("freq_dim", 256),
                text_dim=config.get("text_dim", 4096), image_dim=config.get("image_dim"),
                pos_embed_seq_len=config.get("pos_embed_seq_len"), cross_attn_norm=config.get("cross_attn_norm", True),
                eps=config.get("eps", 1e-6), rope_max_seq_len=config.get("rope_max_seq_len", 1024))
    return arch


def diffusers_config(arch: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``WanTransformer3DModel`` config.json for mm's WanDiTConfig keys."""
    image = arch.get("image_dim")
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(arch.get("patch_size", [1, 2, 2])),
            "num_attention_heads": arch["num_heads"], "attention_head_dim": arch["hidden_size"] // arch["num_heads"],
            "in_channels": arch.get("in_dim", 16), "out_channels": arch.get("out_dim", 16),
            "text_dim": arch.get("text_dim", 4096), "freq_dim": arch.get("freq_dim", 256), "ffn_dim": arch["ffn_dim"],
            "num_layers": arch["num_layers"], "cross_attn_norm": arch.get("cross_attn_norm", True),
            "qk_norm": "rms_norm_across_heads", "eps": arch.get("eps", 1e-6), "image_dim": image,
            "added_kv_proj_dim": arch["hidden_size"] if image is not None else None,
            "rope_max_seq_len": arch.get("rope_max_seq_len", 1024), "pos_embed_seq_len": arch.get("pos_embed_seq_len")}


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFile:
    """One ``.safetensors`` file read with plain positioned reads (no memory map): a tensor, or a
    range of its rows, costs exactly its bytes of memory, and nothing stays mapped afterwards."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (length,) = __import__("struct").unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self._base = 8 + length
        self.entries = header

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
        with open(self.path, "rb") as f:
            f.seek(self._base + begin)
            f.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class HFSource(Source):
    """``*.safetensors`` (diffusers' sharded files with their index, or the original release's) and
    ``config.json`` in one directory."""

    def __init__(self, directory: str | Path, option: str = "--cfg.source_path"):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConvertError(f"{option} = {str(directory)!r}: not a directory")
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{option} = {str(directory)!r}: no *.safetensors files there (a diffusers "
                               "transformer directory or the original Wan release)")
        self._file_of: dict[str, SafetensorsFile] = {}
        for f in files:
            try:
                handle = SafetensorsFile(f)
            except (OSError, ValueError) as e:
                raise ConvertError(f"{option}: {f} is not a readable safetensors file: {e}") from None
            for key in handle.keys():
                if key in self._file_of:
                    raise ConvertError(f"{option}: tensor {key!r} is in more than one file ({f.name})")
                self._file_of[key] = handle
        try:
            self.format = detect_format(self._file_of)
        except WeightMappingError as e:
            raise ConvertError(f"{option} = {str(directory)!r}: {e}") from None
        self.origin = f"{self.format} weights in {self.directory}"
        self.arch = self._read_arch(option)
        self._keys = self._map_keys()

    def _shape(self, name: str) -> list[int]:
        return self._file_of[name].shape(name)

    def _read_arch(self, option: str) -> dict[str, Any]:
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise ConvertError(f"{option} = {str(self.directory)!r}: no config.json (it gives the number of attention "
                               "heads, which the weights do not)")
        config = json.loads(config_file.read_text())
        self.hf_config = config
        if self.format == "diffusers":
            missing = [k for k in ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim",
                                   "in_channels", "out_channels") if k not in config]
            if missing:
                raise ConvertError(f"{config_file}: a diffusers config without {', '.join(missing)}")
            return arch_from_diffusers(config)
        # the original release: dim / num_heads / ...; the image branch is read from the weights
        missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k not in config]
        if missing:
            raise ConvertError(f"{config_file}: an original Wan config without {', '.join(missing)}")
        # the sizes the weights carry come from the weights
        patch = self._shape("patch_embedding.weight")
        kernel = patch[2:]
        head = self._shape("head.head.weight")[0]
        arch = dict(num_layers=config["num_layers"], num_heads=config["num_heads"], hidden_size=config["dim"],
                    ffn_dim=config["ffn_dim"], in_dim=patch[1], out_dim=head // (kernel[0] * kernel[1] * kernel[2]),
                    patch_size=list(kernel), freq_dim=self._shape("time_embedding.0.weight")[1],
                    text_dim=self._shape("text_embedding.0.weight")[1], image_dim=None, pos_embed_seq_len=None,
                    cross_attn_norm=config.get("cross_attn_norm", True), eps=config.get("eps", 1e-6),
                    rope_max_seq_len=1024)
        if "img_emb.proj.0.weight" in self._file_of:
            arch["image_dim"] = self._shape("img_emb.proj.0.weight")[0]
        if "img_emb.emb_pos" in self._file_of:
            arch["pos_embed_seq_len"] = self._shape("img_emb.emb_pos")[1]
        return arch

    def _map_keys(self) -> list[str]:
        """Every table row whose source tensors are all present (a row's parts all or none), and
        the check that nothing is left over and the layer count is the config's."""
        keys, used, partial = [], set(), []
        layers = sorted({int(m.group(1)) for k in self._file_of if (m := _BLOCK.match(k))})
        for rule in WAN_NAME_TABLE:
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
        ignored = IGNORED_SOURCE_KEYS[self.format]
        unexpected = sorted(k for k in self._file_of if k not in used and not any(p.match(k) for p in ignored))
        problems = []
        if partial:
            problems.append(f"incomplete ({len(partial)}): {'; '.join(partial[:10])}")
        if unexpected:
            problems.append(f"not in the Wan name table ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if layers != list(range(self.arch["num_layers"])):
            problems.append(f"layers {layers[:3]}...{layers[-3:] if layers else []} ({len(layers)}) but config.json "
                            f"says num_layers = {self.arch['num_layers']}")
        if problems:
            raise ConvertError(f"{self.origin} do not match the Wan DiT:\n  " + "\n  ".join(problems))
        return keys

    def keys(self) -> list[str]:
        return list(self._keys)

    def _names(self, key: str) -> list[str]:
        rule, values = rule_for(key)
        return [s.format(**values) for s in rule.sources(self.format)]

    def parts(self, key: str) -> list[torch.Tensor]:
        return [self._file_of[n].read(n) for n in self._names(key)]

    def local(self, key: str, tp: int, rank: int) -> torch.Tensor:
        """Reads only the rank's rows of a column-split tensor (a row-split one is read whole and cut)."""
        rule, _ = rule_for(key)
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
    from mm.training.checkpointing import CheckpointError, checkpoint_dir, read_tracker

    try:
        iteration = read_tracker(root, option)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if iteration is None:
        raise ConvertError(f"{option} = {str(root)!r}: no latest_checkpointed_iteration.txt (pass the directory "
                           "that --save wrote or mm-convert hf_to_mm made)")
    path = checkpoint_dir(root, iteration)
    if not path.is_dir():
        raise ConvertError(f"{option} = {str(root)!r}: the tracker names {path.name}, which does not exist")
    return path


def open_mm_source(directory: str | Path, option: str = "--cfg.source_path") -> Source:
    """An mm checkpoint directory (the one with latest_checkpointed_iteration.txt), either format."""
    from mm.training import checkpoint_torch

    root = Path(directory)
    if not root.is_dir():
        raise ConvertError(f"{option} = {str(directory)!r}: not a directory")
    path = _checkpoint_path(root, option)
    if checkpoint_torch.is_torch_checkpoint(path):
        return TorchSource(path, option)
    if (path / "metadata.json").is_file():
        return TorchDistSource(path, option)
    raise ConvertError(f"{option}: {path} is neither a torch-format (checkpoint.json) nor a torch_dist "
                       "(metadata.json) checkpoint")


def _arch_of(header: dict, path: Path, option: str) -> dict[str, Any]:
    arch = (header.get("extra") or {}).get("predictor")
    if not arch:
        raise ConvertError(f"{option}: {path} does not record the model's predictor config (extra.predictor); it was "
                           "written by an mm without it")
    return dict(arch)


class TorchSource(Source):
    """``mp_rank_XX[_YYY]/model_optim_rng.pt`` of any TP/PP/VPP, opened memory-mapped."""

    def __init__(self, path: Path, option: str):
        from mm.training import checkpoint_torch

        self.path = path
        self.header = checkpoint_torch.read_header(path)
        self.arch = _arch_of(self.header, path, option)
        parallel = self.header["parallel"]
        self.tp, self.pp = parallel["tensor_model_parallel_size"], parallel["pipeline_model_parallel_size"]
        chunks = parallel.get("virtual_pipeline_model_parallel_size") or 1
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
        from mm.training import checkpoint_torch

        if (tp_rank, stage) not in self._files:
            f = checkpoint_torch.rank_dir(self.path, tp_rank, stage, self.pp) / checkpoint_torch.MODEL_FILE
            if not f.is_file():
                raise ConvertError(f"{self.origin}: {f} is missing")
            self._files[(tp_rank, stage)] = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        return self._files[(tp_rank, stage)]

    def release(self) -> None:
        self._files.clear()

    def keys(self) -> list[str]:
        return list(self._where)

    def parts(self, key: str) -> list[torch.Tensor]:
        rule, _ = rule_for(key)
        stage, ck, local = self._where[key]
        n = len(rule.diffusers)
        per_rank = [self._file(r, stage)[ck][local] for r in range(self.tp)]
        pieces = [t.chunk(n, dim=0) if n > 1 else (t,) for t in per_rank]
        out = []
        for j in range(n):
            if rule.split is None or self.tp == 1:
                out.append(pieces[0][j])
            else:
                out.append(torch.cat([p[j] for p in pieces], dim=0 if rule.split == "column" else 1))
        return out


class TorchDistSource(Source):
    """A torch_dist checkpoint: tensors stored under global keys with un-split shapes (fused rows as
    ``[parts, ...]``), read one at a time without process groups."""

    def __init__(self, path: Path, option: str):
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import FileSystemReader

        self.path = path
        self.header = dist_checkpointing.load_common_state_dict(str(path))
        self.arch = _arch_of(self.header, path, option)
        self.origin = f"the mm checkpoint {path} (torch_dist)"
        self._reader = FileSystemReader(str(path))
        metadata = self._reader.read_metadata().state_dict_metadata
        self._meta = {}
        for key, meta in metadata.items():
            if key.startswith(("optimizer.", "ema.", "rng_state", "common")) or not hasattr(meta, "size"):
                continue
            try:
                rule_for(key)
            except WeightMappingError:
                continue
            self._meta[key] = meta

    def keys(self) -> list[str]:
        return list(self._meta)

    def parts(self, key: str) -> list[torch.Tensor]:
        from torch.distributed.checkpoint import load

        meta = self._meta[key]
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        load({key: tensor}, storage_reader=self._reader, no_dist=True)
        rule, _ = rule_for(key)
        return list(tensor.unbind(0)) if len(rule.diffusers) > 1 else [tensor]


def iter_layer_keys(keys: list[str], first: int, count: int) -> Iterator[str]:
    for key in keys:
        m = _BLOCK.match(key)
        if m and first <= int(m.group(1)) < first + count:
            yield key
