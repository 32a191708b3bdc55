"""DiT predictors, built from megatron-core tensor-parallel layers; ``build_predictor`` picks one by
the model JSON's ``predictor.model_id``."""

from __future__ import annotations

from typing import Any

from mm.models.predictor.wan import WanDiT, WanDiTConfig

PREDICTORS = {"wan_dit": (WanDiT, WanDiTConfig)}


def build_predictor(model_id: str, params: dict[str, Any], **kwargs: Any):
    """The predictor ``model_id`` with the JSON ``params`` (predictor section minus the common keys)."""
    if model_id not in PREDICTORS:
        raise ValueError(f"predictor.model_id = {model_id!r}; valid: {', '.join(sorted(PREDICTORS))}")
    model_cls, config_cls = PREDICTORS[model_id]
    return model_cls(config_cls.from_json(params), **kwargs)
