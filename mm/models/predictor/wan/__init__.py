"""Wan DiT (Wan2.1 T2V / I2V / FLF2V, Wan2.2 T2V/I2V-A14B experts, TI2V-5B) on megatron-core."""

from mm.models.predictor.wan.config import WanDiTConfig
from mm.models.predictor.wan.model import WanDiT
from mm.models.predictor.wan.weights import (
    WAN_NAME_TABLE,
    WeightMappingError,
    hf_to_mm,
    load_hf_weights,
    mm_to_hf,
)

__all__ = ["WAN_NAME_TABLE", "WanDiT", "WanDiTConfig", "WeightMappingError", "hf_to_mm", "load_hf_weights", "mm_to_hf"]
