"""Pre-extracted features: what ``extract_features.py`` writes and ``dataset_type: feature`` trains on.

A features directory (MindSpeed-MM's ``sora_features/`` layout) holds:

- ``data.jsonl``: one JSON object per sample, the source annotation's fields (``path``, ``cap``,
  ``num_frames``, ``fps``, ``resolution``) and ``file``, the feature file relative to the directory
  (MindSpeed-MM's key); mm adds ``latent_shape`` ``[c, f, h, w]`` and ``bucket`` (the sample's bucket
  number in the extraction's data pipeline), so training groups and orders micro-batches as it would
  have with the videos;
- ``features/``: one file per sample: ``video`` (the VAE latents, normalised as the DiT reads them,
  ``[c, f, h, w]``), ``prompt_ids`` / ``prompt_mask`` (the first text encoder's embedding ``[L, d]`` and
  its mask ``[L]``: MindSpeed-MM's names, which hold the embedding, not token ids), ``prompt_ids_2`` /
  ``prompt_mask_2`` for a second encoder, and a conditioned recipe's ``condition`` / ``context_image``;
- ``features.json``: how they were made (the dataset type, the encoders, the shapes), which training
  checks against its model JSON before anything starts.

mm writes safetensors (``.safetensors``) or, with ``--feature-format pt``, MindSpeed-MM's torch files
(``.pt``, a dict of the same keys, a list under ``prompt_ids`` for several encoders, the image
conditioning under MindSpeed-MM's ``i2v_vae_feature`` / ``i2v_clip_feature``); it reads both.
MindSpeed-MM's ``FeatureDataset`` reads only ``.pt``.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MANIFEST = "features.json"
INDEX = "data.jsonl"
FORMATS = ("safetensors", "pt")
CONDITION_KEYS = ("condition", "context_image")
# MindSpeed-MM's names of the image conditioning in its .pt files (its Wan I2V processor: the mask channels
# then the first frame's latents, as mm's condition; CLIP's penultimate hidden states)
MINDSPEED_CONDITION_KEYS = {"condition": "i2v_vae_feature", "context_image": "i2v_clip_feature"}


_MINDSPEED_TO_MM = {theirs: ours for ours, theirs in MINDSPEED_CONDITION_KEYS.items()}


def text_keys(index: int) -> tuple[str, str]:
    """The feature file's keys of text encoder ``index`` (0-based): MindSpeed-MM's names."""
    suffix = "" if index == 0 else f"_{index + 1}"
    return f"prompt_ids{suffix}", f"prompt_mask{suffix}"


def feature_name(source: str, fmt: str) -> str:
    """A sample's feature file name: the source's base name with dots replaced (as MindSpeed-MM names
    them), then a checksum of the whole path, so same-named videos of different folders do not collide."""
    base = os.path.basename(source).replace(".", "_")
    return f"{base}_{zlib.crc32(source.encode()):08x}.{fmt}"


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` beside ``path``, then renamed over it: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_features(path: Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    """One sample's features (the keys of the module docstring) to ``path``, atomically: a reader never
    sees half a file, and an interrupted extraction leaves none."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "mm-features"}))
    elif fmt == "pt":
        stored: dict[str, Any] = dict(tensors)
        ids = [stored.pop(k) for k in sorted(k for k in tensors if k.startswith("prompt_ids"))]
        masks = [stored.pop(k) for k in sorted(k for k in tensors if k.startswith("prompt_mask"))]
        stored["prompt_ids"], stored["prompt_mask"] = (ids[0], masks[0]) if len(ids) == 1 else (ids, masks)
        for key, theirs in MINDSPEED_CONDITION_KEYS.items():
            if key in stored:
                stored[theirs] = stored.pop(key)
        atomic_write(path, lambda tmp: torch.save(stored, str(tmp)))
    else:
        raise ValueError(f"feature format {fmt!r}; valid: {', '.join(FORMATS)}")


def read_features(path: str | Path) -> dict[str, torch.Tensor]:
    """One sample's features with mm's keys (``prompt_ids``, ``prompt_ids_2``, ... however stored)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if path.endswith(".pt"):
        data = torch.load(path, map_location="cpu", weights_only=True)
        out = {}
        for key, value in data.items():
            if key in ("prompt_ids", "prompt_mask") and isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    out[text_keys(i)[0 if key == "prompt_ids" else 1]] = item
            elif isinstance(value, torch.Tensor):
                out[_MINDSPEED_TO_MM.get(key, key)] = value
        return out
    raise ValueError(f"feature file {path!r}: expected a .safetensors or .pt file")


def latent_shape_of(path: str | Path) -> tuple[int, ...]:
    """The ``video`` latents' shape of a feature file (safetensors: from its header, without the data)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice("video").get_shape())
    return tuple(read_features(path)["video"].shape)


@dataclass
class Manifest:
    """``features.json``: what made a features directory."""

    dataset_type: str  # the extraction's data JSON's dataset_type (the conditioning trained)
    model_id: str = ""  # predictor.model_id of the model JSON it was made for
    latent_channels: int | None = None
    text_dims: list[int] = field(default_factory=list)  # each text encoder's embedding width
    text_lengths: list[int] = field(default_factory=list)
    ae: dict[str, Any] = field(default_factory=dict)
    text_encoders: list[dict[str, Any]] = field(default_factory=list)
    dtype: str = "fp32"
    format: str = "safetensors"

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest | None":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def write(self, directory: str | Path) -> None:
        path = Path(directory) / MANIFEST
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n"))


def feature_folder(data_path: str, data_folder: str | None) -> Path:
    """Where the index's ``file`` entries are relative to: ``data_folder`` when given (MindSpeed-MM's
    key), else the folder of ``data.jsonl``."""
    return Path(data_folder) if data_folder else Path(data_path).parent


@dataclass(frozen=True)
class FeatureSample:
    file: str  # absolute
    caption: str
    latent_shape: tuple[int, ...] | None
    bucket: int | None
    source: str


def read_index(data_path: str, data_folder: str | None) -> tuple[list[FeatureSample], Counter]:
    """The samples of a ``data.jsonl`` whose feature files exist, and the count of those left out;
    errors name the file and line."""
    index = Path(data_path)
    if not index.is_file():
        raise FileNotFoundError(f"dataset_param.basic_parameters.data_path = {data_path!r}: no such file (the "
                                f"{INDEX} that extract_features.py writes)")
    folder = feature_folder(data_path, data_folder)
    samples, dropped = [], Counter()
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{data_path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(entry, dict) or "file" not in entry:
            raise ValueError(f"{data_path}:{number}: needs 'file' (the feature file, relative to "
                             f"{str(folder)!r}); got {line[:120]!r}")
        file = folder / entry["file"]
        if not file.is_file():
            dropped["feature file missing"] += 1
            continue
        cap = entry.get("cap", "")
        shape = entry.get("latent_shape")
        samples.append(FeatureSample(str(file), cap if isinstance(cap, str) else (cap or [""])[0],
                                     tuple(shape) if shape else None, entry.get("bucket"), entry.get("path", "")))
    if not samples:
        raise ValueError(f"{data_path}: no usable samples ({dict(dropped) or 'the index is empty'})")
    return samples, dropped


class FeatureDataset(torch.utils.data.Dataset):
    """Item ``i``: ``{"latents" [c, f, h, w], "context": [embedding of each text encoder], "context_mask":
    [...], "condition", "context_image" (or None), "bucket", "path", "skipped"}``. Buckets: the
    extraction's bucket numbers where every entry has one (so the sampler orders micro-batches as it
    did with the videos), else the distinct latent shapes in sorted order. A file that cannot be read is
    replaced by another of the same bucket; what was skipped, and why, travels in ``skipped``."""

    def __init__(self, samples: list[FeatureSample], num_text_encoders: int, max_substitutes: int = 8, seed: int = 42):
        self.samples, self.num_text, self.max_substitutes, self.seed = samples, num_text_encoders, max_substitutes, seed
        if all(s.bucket is not None for s in samples):
            self.bucket_of = [int(s.bucket) for s in samples]
        else:
            shapes = [s.latent_shape or latent_shape_of(s.file) for s in samples]
            number = {shape: i for i, shape in enumerate(sorted(set(shapes)))}
            self.bucket_of = [number[s] for s in shapes]
        self.by_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            self.by_bucket.setdefault(b, []).append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> dict:
        sample = self.samples[index]
        data = read_features(sample.file)
        if "video" not in data:
            raise KeyError("no 'video' latents")
        context, masks = [], []
        for k in range(self.num_text):
            ids, mask = text_keys(k)
            if ids not in data or mask not in data:
                raise KeyError(f"no {ids!r}/{mask!r} (text encoder {k + 1})")
            context.append(data[ids])
            masks.append(data[mask])
        return {"latents": data["video"], "context": context, "context_mask": masks,
                **{key: data.get(key) for key in CONDITION_KEYS}, "bucket": self.bucket_of[index],
                "path": sample.source or sample.file}

    def __getitem__(self, index: int) -> dict:
        skipped = []
        peers = self.by_bucket[self.bucket_of[index]]
        rng = random.Random(self.seed * 1_000_003 + index)
        candidate = index
        for _ in range(self.max_substitutes + 1):
            try:
                item = self._load(candidate)
                item["skipped"] = skipped
                return item
            except Exception as e:  # noqa: BLE001 -- any unreadable file is a bad sample, counted
                skipped.append((self.samples[candidate].file, f"unreadable feature file ({type(e).__name__})"))
                candidate = rng.choice(peers)
        raise RuntimeError(f"{len(skipped)} unreadable feature files in a row in bucket {self.bucket_of[index]}: "
                           f"{skipped}; the features look broken (rerun extract_features.py, which rewrites missing "
                           "files)")


def collate_features(items: list[dict]) -> dict:
    """Stack one bucket's feature items (the keys ``BatchEncoder`` returns for the videos)."""
    out = {"latents": torch.stack([i["latents"] for i in items]),
           "context": [torch.stack([i["context"][k] for i in items]) for k in range(len(items[0]["context"]))],
           "context_mask": [torch.stack([i["context_mask"][k] for i in items])
                            for k in range(len(items[0]["context_mask"]))],
           "bucket": items[0]["bucket"], "path": [i["path"] for i in items],
           "skipped": [s for i in items for s in i["skipped"]]}
    for key in CONDITION_KEYS:
        out[key] = None if items[0][key] is None else torch.stack([i[key] for i in items])
    return out


def build_feature_dataloader(data, num_text_encoders: int, micro_batch_size: int, data_parallel_rank: int,
                             data_parallel_size: int, consumed_samples: int = 0, num_workers: int = 2,
                             seed: int = 1234, pin_memory: bool = False):
    """``build_video_dataloader``'s counterpart for ``dataset_type: feature``: the same bucketed,
    DP-aware, resumable sampler over the features' index."""
    from mm.data.sampler import BucketSampler

    samples, dropped = data.sources if data.sources is not None else read_index(data.data_path, data.data_folder)
    if dropped and data_parallel_rank == 0:
        import logging

        logging.getLogger(__name__).warning("data: %d feature entries left out at start-up (%s)",
                                            sum(dropped.values()), dict(dropped))
    dataset = FeatureDataset(samples, num_text_encoders)
    sampler = BucketSampler(dataset.bucket_of, micro_batch_size, data_parallel_rank, data_parallel_size,
                            consumed_samples=consumed_samples, seed=seed,
                            shuffle=bool(data.dataloader.get("shuffle", True)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_features,
                                         num_workers=num_workers, prefetch_factor=2 if num_workers else None,
                                         persistent_workers=num_workers > 0,
                                         pin_memory=pin_memory and data.dataloader.get("pin_memory") is not False)
    return loader, dataset
