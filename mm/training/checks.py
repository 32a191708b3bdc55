"""What ``pretrain_t2v.py`` / ``pretrain_i2v.py`` check of a configuration before any process group
starts: the family's rules (its spec and recipe), what every family shares, the data files the data
JSON names and the directories the run will write."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mm.arguments import ConfigError
from mm.data.dataset import VideoDataConfig
from mm.data.features import Manifest, feature_folder, read_index
from mm.data.sources import read_data_txt
from mm.families import resolve
from mm.families.spec import TRAINING_ENTRY_POINTS


def check_task(task: str, config, *, files: bool = True, weights: bool = True) -> None:
    """The model JSON, data JSON and entry point fit together (raises ConfigError listing every problem);
    with ``files``, also the data files the data JSON names can be read and the output directories of
    the flags written (the launch scripts' tests check their configurations without either); with
    ``weights``, the release's files the JSONs name (the family's ``weight_checks``: mm-plan plans
    without the weights)."""
    from mm.training.logger import LogConfig, require_logging_packages

    family, arch = resolve(config.model.predictor)
    if config.data.features and task == "i2v" and config.data.dataset_type == "t2v" and \
            Manifest.read(feature_folder(config.data.data_path, config.data.data_folder)) is None:
        # MindSpeed-MM's features record no dataset type: pretrain_i2v.py reads them as image-conditioned
        config.data.dataset_type = "i2v"
    problems = family.problems(config, arch, weights=weights) + family.recipe.check(task, config, arch)
    encoders, tokenizers = len(config.model.text_encoder), len(config.data.tokenizers)
    loads = {key: getattr(config.model, key) for key in ("load_video_features", "load_text_features")}
    if config.data.features:
        problems += feature_problems(family, config)
        problems += [f"{key} = false with dataset_type 'feature': mm reads the latents and the text embeddings from "
                     "the features; valid: true (or leave it out)" for key, value in loads.items() if value is False]
    else:
        problems += [f"{key} = true: training on extracted features reads a data JSON of dataset_type 'feature' "
                     f"(extract_features.py writes one's files); --mm-data {config.data.path} has dataset_type "
                     f"{config.data.dataset_type!r}" for key, value in loads.items() if value]
    if not config.data.features and config.data.use_text_processer and tokenizers != encoders:
        problems.append(f"dataset_param.tokenizer_config: {tokenizers} tokenizer(s) for {encoders} text encoder(s) "
                        "in the model JSON's text_encoder; valid: one tokenizer_config per text encoder, in order "
                        "(a list when there are several)")
    problems += preprocess_problems(config.data)
    if config.model.task is not None and config.model.task != task:
        problems.append(f"task = {config.model.task!r} in the model JSON: train it with "
                        f"{TRAINING_ENTRY_POINTS[config.model.task]}, not {TRAINING_ENTRY_POINTS[task]}")
    try:
        require_logging_packages(LogConfig.from_args(config.args))
    except SystemExit as e:
        problems.append(str(e))
    if files:
        problems += output_dir_problems(config.args)
        problems += read_data_files(config.data)
    if problems:
        raise ConfigError(problems)


# the flags naming a directory the run writes into
OUTPUT_DIR_FLAGS = (("--save", "save"), ("--tensorboard-dir", "tensorboard_dir"),
                    ("--wandb-save-dir", "wandb_save_dir"))


def writable_dir_problem(flag: str, path: str) -> str | None:
    """Create ``path`` (and its parents) and write and remove a probe file in it, as the run will;
    None when that works, else a problem naming ``flag``, the path and the OS's reason."""
    directory = Path(path)
    where = path if directory.is_absolute() else f"{path} (from {Path.cwd()})"
    probe = directory / f".mm_write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"mm")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as e:
        failed = f" on {e.filename!r}" if e.filename else ""
        return (f"{flag} {where}: cannot create and write this directory ({e.strerror or e}{failed}); valid: a "
                "directory this user can create and write")
    return None


def output_dir_problems(args) -> list[str]:
    """Every directory flag of ``OUTPUT_DIR_FLAGS`` that is set and cannot be created and written."""
    found = (writable_dir_problem(flag, getattr(args, name)) for flag, name in OUTPUT_DIR_FLAGS
             if getattr(args, name, None) is not None)
    return [problem for problem in found if problem is not None]


def preprocess_problems(data) -> list[str]:
    """The data JSON's preprocessing, checked before any process group starts rather than in the loader
    (features were preprocessed when they were extracted)."""
    if data is None or data.features:
        return []
    try:
        VideoDataConfig.from_json(data.preprocess, data.dataset_type)
    except (TypeError, ValueError) as e:
        return [str(e)]
    return []


def read_data_files(data) -> list[str]:
    """Read the data JSON's data.txt with its annotation files and dataset roots
    (``mm.data.sources.read_data_txt``), keeping what was read in ``data.sources`` for the data
    loader; the problems found (empty when it reads)."""
    if data is None:
        return []
    try:
        data.sources = read_index(data.data_path, data.data_folder) if data.features else read_data_txt(data.data_path)
    except ValueError as e:
        return [str(e)]
    except OSError as e:
        if e.filename is None:  # read_data_txt's own message
            return [str(e)]
        return [f"dataset_param.basic_parameters.data_path = {data.data_path!r}: cannot read {e.filename!r} "
                f"({e.strerror})"]
    return []


def feature_problems(family, config) -> list[str]:
    """A ``dataset_type: feature`` data JSON against the model JSON: what its ``features.json`` says
    the features were made for (the predictor, the number of text embeddings)."""
    folder = feature_folder(config.data.data_path, config.data.data_folder)
    try:
        manifest = Manifest.read(folder)
    except (OSError, ValueError, TypeError):
        return []  # the data JSON's parse reported it
    if manifest is None:  # MindSpeed-MM's features: no record of what made them
        return []
    problems = []
    model_id = config.model.predictor.model_id
    if manifest.model_id and family.predictors.get(manifest.model_id) is None:
        problems.append(f"{folder / 'features.json'}: extracted for predictor.model_id = {manifest.model_id!r} "
                        f"(another family than {model_id!r}, {family.name}); extract them with this model JSON")
    if manifest.text_dims and len(manifest.text_dims) != family.num_text_encoders:
        problems.append(f"{folder / 'features.json'}: {len(manifest.text_dims)} text embedding(s) per sample; "
                        f"predictor {model_id!r} ({family.name}) reads {family.num_text_encoders}")
    return problems
