"""The Open-Sora-Plan v1.3 DiT (T2V ``videoditsparse``, I2V ``videoditsparsei2v``) on megatron-core."""

from mm.models.predictor.opensoraplan.config import OpenSoraPlanDiTConfig, OpenSoraPlanI2VConfig
from mm.models.predictor.opensoraplan.model import OpenSoraPlanDiT

__all__ = ["OpenSoraPlanDiT", "OpenSoraPlanDiTConfig", "OpenSoraPlanI2VConfig"]
