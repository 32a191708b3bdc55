"""Layer 4: noise schedules, training objectives and samplers (pure tensor math, no parallelism)."""

from mm.diffusion.flow_matching import FlowMatching, FlowMatchingConfig, shift_sigma, unshift_sigma

__all__ = ["FlowMatching", "FlowMatchingConfig", "shift_sigma", "unshift_sigma"]
