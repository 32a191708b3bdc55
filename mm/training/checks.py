"""What ``pretrain_t2v.py`` / ``pretrain_i2v.py`` check of a configuration before any process group
starts: the family's rules (its spec and recipe) and what every family shares."""

from __future__ import annotations

from mm.arguments import ConfigError
from mm.data.dataset import VideoDataConfig
from mm.families import resolve
from mm.families.spec import TRAINING_ENTRY_POINTS


def check_task(task: str, config) -> None:
    """The model JSON, data JSON and entry point fit together (raises ConfigError listing every problem)."""
    from mm.training.logger import LogConfig, require_logging_packages

    family, arch = resolve(config.model.predictor)
    problems = family.problems(config, arch) + family.recipe.check(task, config, arch)
    encoders, tokenizers = len(config.model.text_encoder), len(config.data.tokenizers)
    if config.data.use_text_processer and tokenizers != encoders:
        problems.append(f"dataset_param.tokenizer_config: {tokenizers} tokenizer(s) for {encoders} text encoder(s) "
                        "in the model JSON's text_encoder; valid: one tokenizer_config per text encoder, in order "
                        "(a list when there are several)")
    try:  # the data JSON's preprocessing, before any process group starts rather than in the loader
        VideoDataConfig.from_json(config.data.preprocess, config.data.dataset_type)
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    if config.model.task is not None and config.model.task != task:
        problems.append(f"task = {config.model.task!r} in the model JSON: train it with "
                        f"{TRAINING_ENTRY_POINTS[config.model.task]}, not {TRAINING_ENTRY_POINTS[task]}")
    try:
        require_logging_packages(LogConfig.from_args(config.args))
    except SystemExit as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems)
