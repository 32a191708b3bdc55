"""mm: Megatron-style parallel training and inference for video diffusion transformers.

Importing mm imports nothing heavy and needs none of the optional packages (torch_npu, apex,
transformer-engine, flash-attn); the subpackages import what they use.
"""

__version__ = "0.1.0"
