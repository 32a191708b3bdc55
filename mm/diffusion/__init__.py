"""Layer 4: noise schedules, training objectives and samplers (pure tensor math, no parallelism)."""

from mm.diffusion.ddpm import DDPM, DDPMConfig, NoiseSchedule
from mm.diffusion.ddpm_samplers import DDPMSamplerConfig, build_ddpm_sampler, classifier_free_guidance
from mm.diffusion.flow_match_discrete import (FlowMatchDiscrete, FlowMatchDiscreteConfig, FlowMatchDiscreteSampler,
                                              guidance_enabled, guided_velocity)
from mm.diffusion.flow_matching import FlowMatching, FlowMatchingConfig, shift_sigma, unshift_sigma

__all__ = ["DDPM", "DDPMConfig", "DDPMSamplerConfig", "FlowMatchDiscrete", "FlowMatchDiscreteConfig",
           "FlowMatchDiscreteSampler", "FlowMatching", "FlowMatchingConfig", "NoiseSchedule", "build_ddpm_sampler",
           "classifier_free_guidance", "guidance_enabled", "guided_velocity", "shift_sigma", "unshift_sigma"]
