"""Feature extraction: the loop behind ``extract_features.py`` (MindSpeed-MM's ``feature_extraction.sh``).

The model JSON's VAE and text encoders (the family's, built as training builds them) encode every
sample of the data JSON once; training then reads the features (``dataset_type: feature``,
``mm.data.features``) and runs no encoder. Each sample is read by the training data pipeline (its
bucket, frame sampling at epoch 0, resize and crop, tokenisation) and encoded by the training loop's
``BatchEncoder``, so a run on the features trains on what a run on the videos would have encoded in
its first epoch (the noise and noise levels come from the run seed and the sample's place, in either).

All ranks share the work: rank r encodes samples r, r + W, r + 2W, ... of the dataset. Each feature
file is written atomically; a rerun skips the samples whose file exists (resume after an interruption),
and retries the bad ones. A video that cannot be read is skipped and counted by reason (not replaced
by another, as training does: its features would be filed under the wrong video). At the end rank 0
writes ``data.jsonl`` (the samples whose features exist, in dataset order) and ``features.json``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from mm.accelerator import destroy_distributed, naming_collective_failures, rank0_print
from mm.arguments import ConfigError
from mm.data.dataset import BadSample, collate
from mm.data.features import CONDITION_KEYS, INDEX, Manifest, feature_folder, feature_name, text_keys, write_features
from mm.data.loader import build_video_dataset
from mm.families import families, resolve
from mm.models.predictor.transformer_config import params_dtype
from mm.runtime import EntryPoint, start
from mm.training.checks import preprocess_problems, read_data_files, writable_dir_problem

PROG = "extract_features.py"
TEXT_ONLY = ("t2v", "t2i", "image")  # dataset types whose features are the latents and the text alone


def save_path(config) -> str | None:
    """--save-features, or MindSpeed-MM's --mm-tool JSON key ``sorafeature.save_path``."""
    tool = (config.tool or {}).get("sorafeature") or {}
    return config.args.save_features or tool.get("save_path")


def _check(config) -> None:
    problems = []
    tool = (config.tool or {}).get("sorafeature") or {}
    given = config.args.save_features
    if given and tool.get("save_path") and Path(tool["save_path"]) != Path(given):
        problems.append(f"--save-features {given} and the --mm-tool JSON's sorafeature.save_path = "
                        f"{tool['save_path']!r} differ; give one")
    where = save_path(config)
    if not where:
        problems.append("--save-features is required: the directory the features are written to (or the --mm-tool "
                        "JSON's sorafeature.save_path, as MindSpeed-MM's feature_extraction.sh gives it)")
    else:
        problem = writable_dir_problem("--save-features", str(Path(where) / "features"))
        if problem:
            problems.append(problem)
    family, arch = resolve(config.model.predictor)
    if config.data is not None and config.data.dataset_type not in TEXT_ONLY and \
            not getattr(family.recipe, "features_condition", False):
        problems.append(f"dataset_param.dataset_type = {config.data.dataset_type!r} with predictor "
                        f"{config.model.predictor.model_id!r} ({family.name}): its condition is drawn anew each "
                        "batch (e.g. random masks), which features would fix once; extract_features.py extracts "
                        f"its {', '.join(TEXT_ONLY)} data (train on the videos otherwise)")
    problems += family.problems(config, arch)
    problems += preprocess_problems(config.data)
    if config.data is not None and not problems:
        problems += read_data_files(config.data)
    if problems:
        raise ConfigError(problems)


def encoders_only(data: dict, problems: list[str], notes: list[str]) -> dict:
    """A model JSON without a predictor (MindSpeed-MM's feature-extraction files hold the VAE and text encoders
    alone) gets the predictor section of the family whose VAE it names (``FamilySpec.feature_predictor``)."""
    ae = data.get("ae")
    if "predictor" in data or not isinstance(ae, dict):
        return data
    specs = [s for s in families() if ae.get("model_id") in s.ae_model_ids and s.feature_predictor is not None]
    if not specs:
        return data  # "predictor is required", from the model JSON's reader
    return dict(data, predictor=specs[0].feature_predictor(data, problems, notes))


def entry_point() -> EntryPoint:
    """What ``extract_features.py`` validates before any process group: the flags, the model JSON's
    encoders, the data JSON with its files, and the output directory."""
    return EntryPoint(prog=PROG, mode="features", check=_check, expand=encoders_only)


def extract_features(argv: Sequence[str] | None = None) -> dict:
    """Extract; returns {"written", "existing", "bad"} summed over the ranks (for tests)."""
    entry = entry_point()
    runtime = start(argv, mode=entry.mode, prog=entry.prog, check=entry.check, expand=entry.expand)
    with naming_collective_failures("feature extraction"):
        summary = Extractor(runtime).run()
    with naming_collective_failures("the end of the run"):
        destroy_distributed()
    return summary


class Extractor:
    def __init__(self, runtime):
        from mm.training.pretrain import BatchEncoder, build_frozen_encoders

        cfg, args, acc = runtime.config, runtime.config.args, runtime.accelerator
        self.cfg, self.args, self.device = cfg, args, acc.device()
        self.dtype = params_dtype(args)
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.family, self.arch = resolve(cfg.model.predictor)
        recipe = self.family.recipe(args, cfg, self.arch)
        self.root = Path(save_path(cfg))
        self.files = self.root / "features"
        self.files.mkdir(parents=True, exist_ok=True)
        vae, text_encoders, image_encoder, self.lengths = build_frozen_encoders(self.family, cfg, recipe, self.dtype,
                                                                                self.device, PROG)
        self.text_encoders = text_encoders
        self.encode = BatchEncoder(cfg, recipe, vae, text_encoders, image_encoder, self.device, self.dtype, args.seed)
        self.dataset = build_video_dataset(cfg.data, self.rank, self.family.tokenizer, self.lengths)
        if self.dataset.config.cfg:
            rank0_print(f"{PROG}: preprocess_parameters.cfg = {self.dataset.config.cfg}: every caption is encoded as "
                        "given (caption dropout is a training-time choice; training on features needs cfg 0)")
            self.dataset.config.cfg = 0.0
        self.fmt = args.feature_format

    def name(self, index: int) -> str:
        return feature_name(self.dataset.samples[index].path, self.fmt)

    def _items(self, indices: list[int]):
        """This rank's samples, read in DataLoader workers: (index, batch of one | the BadSample)."""
        dataset = self.dataset

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return len(indices)

            def __getitem__(self, i):
                index = indices[i]
                try:
                    item = dataset._load(index)
                except BadSample as bad:
                    return index, bad.reason
                item["skipped"] = []
                return index, collate([item])

        loader = torch.utils.data.DataLoader(Items(), batch_size=None, num_workers=self.args.num_workers,
                                             prefetch_factor=2 if self.args.num_workers else None)
        return iter(loader)

    def run(self) -> dict:
        mine = list(range(self.rank, len(self.dataset), self.world))
        todo = [i for i in mine if not (self.files / self.name(i)).is_file()]
        counts = Counter(existing=len(mine) - len(todo))
        bad: Counter = Counter()
        rank0_print(f"{PROG}: {len(self.dataset)} samples over {self.world} rank(s); {len(mine)} on rank 0, "
                    f"{counts['existing']} of them already extracted")
        for index, batch in tqdm(self._items(todo), total=len(todo), desc="features", disable=self.rank != 0):
            if isinstance(batch, str):
                bad[batch] += 1
                continue
            encoded = self.encode(batch)
            tensors = {"video": encoded["latents"][0]}
            for k, (context, mask) in enumerate(zip(encoded["context"], encoded["context_mask"])):
                ids_key, mask_key = text_keys(k)
                tensors[ids_key], tensors[mask_key] = context[0], mask[0]
            for key in CONDITION_KEYS:  # image conditioning: the condition latents, the CLIP tokens
                if encoded[key] is not None:
                    tensors[key] = encoded[key][0]
            write_features(self.files / self.name(index), tensors, self.fmt)
            counts["written"] += 1
        everyone = [None] * self.world
        torch.distributed.all_gather_object(everyone, (dict(counts), dict(bad)))
        total, bad_total = Counter(), Counter()
        for c, b in everyone:
            total.update(c)
            bad_total.update(b)
        if self.rank == 0:
            self._write_index()
            skipped = f"; skipped {sum(bad_total.values())} bad samples ({dict(sorted(bad_total.items()))})" \
                if bad_total else ""
            print(f"{PROG}: wrote {total['written']} feature files, {total['existing']} were there already"
                  f"{skipped}; index: {self.root / INDEX}", flush=True)
        torch.distributed.barrier()
        return {"written": total["written"], "existing": total["existing"], "bad": dict(bad_total)}

    def _write_index(self) -> None:
        """``data.jsonl`` (samples whose features exist, in dataset order) and ``features.json``."""
        from mm.data.features import atomic_write, latent_shape_of, read_features

        lines, shape = [], None
        for index, sample in enumerate(self.dataset.samples):
            file = self.files / self.name(index)
            if not file.is_file():
                continue
            shape = latent_shape_of(file)
            entry = {"path": sample.path, "cap": sample.caption, "file": f"features/{file.name}",
                     "latent_shape": list(shape), "bucket": self.dataset.bucket_of[index]}
            if sample.num_frames is not None:
                entry["num_frames"] = sample.num_frames
            if sample.fps is not None:
                entry["fps"] = sample.fps
            if sample.height and sample.width:
                entry["resolution"] = {"height": sample.height, "width": sample.width}
            lines.append(json.dumps(entry))
        atomic_write(self.root / INDEX, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))
        cfg = self.cfg
        text_dims = []
        if lines:  # each text embedding's width, from a file written
            data = read_features(self.root / json.loads(lines[0])["file"])
            text_dims = [int(data[text_keys(k)[0]].shape[-1]) for k in range(len(self.text_encoders))]
        Manifest(dataset_type=cfg.data.dataset_type, model_id=cfg.model.predictor.model_id,
                 latent_channels=shape[0] if shape else None, text_dims=text_dims, text_lengths=self.lengths,
                 ae={"model_id": cfg.model.ae.model_id, "from_pretrained": cfg.model.ae.from_pretrained},
                 text_encoders=[{"model_id": t.model_id, "from_pretrained": t.from_pretrained}
                                for t in cfg.model.text_encoder],
                 dtype="bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32",
                 format=self.fmt).write(self.root)


def main() -> None:
    try:
        extract_features()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume (written files are kept)", file=sys.stderr)
        raise SystemExit(130) from None


__all__ = ["extract_features", "entry_point", "save_path", "main"]
