"""The model-family registry: the one place that lists families.

Built-in families are the modules of ``BUILTIN`` (each exports ``SPEC``, a ``FamilySpec``); a family
outside mm registers through the ``mm.families`` entry-point group of its distribution
(``[project.entry-points."mm.families"] name = "package.module:SPEC"``), which every entry point
(``pretrain_*.py``, ``inference.py``, ``mm-convert``) loads, or in-process with ``register``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from mm.families.spec import FamilySpec, FrameRule, ReleaseConfig, Sampler, StepInputs, Texts

BUILTIN = ("mm.families.wan", "mm.families.opensoraplan", "mm.families.stepvideo")
ENTRY_POINT_GROUP = "mm.families"

_registered: dict[str, FamilySpec] = {}
_loaded = False


def register(spec: FamilySpec) -> None:
    """Add a family; its ``predictor.model_id`` values must be new."""
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register() takes a FamilySpec, got {type(spec).__name__}")
    taken = {m: s.name for s in _registered.values() for m in s.predictors if s.name != spec.name}
    clash = sorted(m for m in spec.predictors if m in taken)
    if clash:
        raise ValueError(f"family {spec.name!r}: predictor.model_id {', '.join(clash)} already belongs to family "
                         f"{taken[clash[0]]!r}")
    _registered[spec.name] = spec


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        register(importlib.import_module(module).SPEC)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        spec = point.load()
        if not isinstance(spec, FamilySpec):
            raise TypeError(f"entry point {point.name} = {point.value!r} of group {ENTRY_POINT_GROUP!r} is a "
                            f"{type(spec).__name__}, not a FamilySpec")
        register(spec)


def families() -> list[FamilySpec]:
    _load()
    return list(_registered.values())


def model_ids() -> list[str]:
    return sorted(m for spec in families() for m in spec.predictors)


def family_for(model_id: str) -> FamilySpec:
    """The family of ``predictor.model_id`` (ValueError naming the key and the valid values)."""
    for spec in families():
        if model_id in spec.predictors:
            return spec
    raise ValueError(f"predictor.model_id = {model_id!r}; valid: {', '.join(model_ids())}")


def resolve(predictor) -> tuple[FamilySpec, Any]:
    """The family of the model JSON's ``predictor`` section and its typed architecture config;
    ConfigError naming the key when either cannot be had."""
    from mm.arguments import ConfigError

    try:
        family = family_for(predictor.model_id)
        return family, family.arch(predictor)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def predictor_config(model_id: str, params: dict[str, Any], num_layers: int | None, num_heads: int | None):
    """The typed architecture config of predictor ``model_id`` from its JSON keys."""
    config_cls = family_for(model_id).predictors[model_id][1]
    return config_cls.from_json(dict(params, num_layers=num_layers, num_heads=num_heads))


def expand_model_json(data: dict[str, Any], problems: list[str], notes: list[str]) -> dict[str, Any]:
    """The model JSON in mm's terms where its ``inference`` section names a family's release task
    (``FamilySpec.release``: e.g. Wan's ``"task": "t2v-1.3B"`` with ``ckpt_dir``); as it is otherwise.
    Problems name the user's keys; ``notes`` gets what the user should know that is not an error."""
    section = data.get("inference")
    if not isinstance(section, dict):
        return data
    task = section.get("task")
    releases = [spec for spec in families() if spec.release is not None]
    for spec in releases:
        if task in spec.release.tasks:
            return spec.release.expand(data, problems, notes)
    stray = [key for key in ("ckpt_dir", "phantom_ckpt") if key in section]
    if stray:
        names = ", ".join(name for spec in releases for name in spec.release.tasks)
        problems.append(f"inference.{stray[0]} is read with a release's task name in inference.task "
                        f"(task is {task!r}); valid task names: {names}")
        data = dict(data, inference={k: v for k, v in section.items() if k not in stray})
    return data


def translate_model_json(data: dict[str, Any], problems: list[str], notes: list[str]) -> dict[str, Any]:
    """The model JSON in mm's terms where a family recognises another tool's layout of it
    (``FamilySpec.translate``: MindSpeed-MM's Wan ``wandit`` JSONs); as it is otherwise."""
    for spec in families():
        if spec.translate is not None:
            data = spec.translate(data, problems, notes)
    return data


def build_predictor(model_id: str, arch_config: Any, config, **stage):
    """Predictor ``model_id`` for this rank (TP/SP/precision/recompute from megatron's ``config``);
    ``stage``: ``pre_process``, ``post_process``, ``layer_offset``, ``num_layers`` of a pipeline stage."""
    return family_for(model_id).build_predictor(model_id, arch_config, config, **stage)


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "FamilySpec", "FrameRule", "ReleaseConfig", "Sampler", "StepInputs", "Texts",
           "build_predictor", "expand_model_json", "translate_model_json", "families", "family_for", "model_ids", "predictor_config", "register", "resolve"]
