"""WanConverter: Wan2.1 / Wan2.2 DiT weights between HuggingFace layouts and mm checkpoints."""

from __future__ import annotations

from checkpoint.converter import DiTConverter
from mm.models.predictor.wan.weights import WAN_WEIGHTS


class WanConverter(DiTConverter):
    """Wan2.1 / Wan2.2 DiT weights.

    Every variant (Wan2.1 T2V/I2V/FLF2V, Wan2.2 T2V/I2V-A14B experts, TI2V-5B) is read from the
    source: config.json and the tensors present. hf_to_mm reads a diffusers WanTransformer3DModel
    directory or the original Wan release; mm_to_hf writes what WanTransformer3DModel.from_pretrained
    loads.

    Args:
        version: wan2.1 or wan2.2.
    """

    WEIGHTS = WAN_WEIGHTS
    VERSIONS = ("wan2.1", "wan2.2")
