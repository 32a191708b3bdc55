"""DiT predictors, built from megatron-core tensor-parallel layers, chosen by the model JSON's
``predictor.model_id``."""

from __future__ import annotations

from typing import Any

from megatron.core.transformer import TransformerConfig

from mm.models.predictor.opensoraplan import OpenSoraPlanDiT, OpenSoraPlanDiTConfig, OpenSoraPlanI2VConfig
from mm.models.predictor.wan import WanDiT, WanDiTConfig

PREDICTORS = {"wan_dit": (WanDiT, WanDiTConfig),
              "videoditsparse": (OpenSoraPlanDiT, OpenSoraPlanDiTConfig),
              "videoditsparsei2v": (OpenSoraPlanDiT, OpenSoraPlanI2VConfig)}


def predictor_config(model_id: str, params: dict[str, Any], num_layers: int | None, num_heads: int | None):
    """The typed architecture config of predictor ``model_id`` from its JSON keys."""
    if model_id not in PREDICTORS:
        raise ValueError(f"predictor.model_id = {model_id!r}; valid: {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[model_id][1].from_json(dict(params, num_layers=num_layers, num_heads=num_heads))


def build_predictor(model_id: str, arch_config: Any, config: TransformerConfig, **stage):
    """Predictor ``model_id`` for this rank (TP/SP/precision/recompute from megatron's ``config``);
    ``stage``: ``pre_process``, ``post_process``, ``layer_offset``, ``num_layers`` of a pipeline stage."""
    return PREDICTORS[model_id][0](arch_config, config, **stage)
