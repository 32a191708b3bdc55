"""StepVideoConverter: Step-Video-T2V DiT weights between the release layout and mm checkpoints."""

from __future__ import annotations

from checkpoint.converter import DiTConverter
from mm.families.stepvideo.weights import STEPVIDEO_WEIGHTS


class StepVideoConverter(DiTConverter):
    """Step-Video-T2V DiT weights (``stepvideodit``).

    hf_to_mm reads the release's ``transformer/`` directory (config.json and
    diffusion_pytorch_model*.safetensors); mm_to_hf writes that layout back; resplit changes the TP /
    PP split of an mm checkpoint.

    Args:
        version: t2v (Step-Video-T2V and its Turbo variant share the DiT).
    """

    WEIGHTS = STEPVIDEO_WEIGHTS
    VERSIONS = ("t2v",)

    def __init__(self, version: str = "t2v"):  # MindSpeed-MM's commands give no --version
        super().__init__(version)
