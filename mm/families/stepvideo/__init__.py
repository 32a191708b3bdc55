"""The Step-Video-T2V family: the 30B DiT (``stepvideodit``), the Step-Video VAE (``stepvideovae``,
chunks of 17 frames -> 3 latent frames), Step-LLM and HunyuanCLIP text encoders, the release's flow
matching (``diffusion.model_id`` ``flow_match_discrete_scheduler``) and ``mm-convert StepVideoConverter``."""

from mm.families.spec import FamilySpec, FrameRule
from mm.families.stepvideo.checks import EXTRA_CHECKS, WEIGHT_CHECKS
from mm.families.stepvideo.config import StepVideoDiTConfig
from mm.families.stepvideo.model import StepVideoDiT
from mm.families.stepvideo.recipe import StepVideoRecipe
from mm.families.stepvideo.sampler import StepVideoSampler
from mm.families.stepvideo.text_encoders import (CLIP_MAX_LENGTH, STEP_LLM_MAX_LENGTH, stepvideo_text_encoder,
                                                 stepvideo_tokenizer)
from mm.families.stepvideo.vae import FRAME_LEN, load_stepvideo_vae, stepvideo_vae_config, vae_factors
from mm.families.stepvideo.weights import STEPVIDEO_LORA


def _load_weights(chunk, source, tp_size: int, tp_rank: int) -> None:
    from mm.families.stepvideo.weights import load_weights

    load_weights(chunk, source, tp_size=tp_size, tp_rank=tp_rank)


def _build_vae(ae, dtype):
    return load_stepvideo_vae(ae.from_pretrained, dtype, ae.params)


def _vae_factors(ae) -> tuple[int, int]:
    return vae_factors(ae.from_pretrained, ae.params)


def _vae_channels(ae) -> int:
    return stepvideo_vae_config(ae.from_pretrained, ae.params).z_channels


def _frame_rule(ae) -> FrameRule:
    cfg = stepvideo_vae_config(ae.from_pretrained, ae.params)
    return FrameRule(cfg.scale_factor_temporal, chunk=FRAME_LEN, chunk_latents=cfg.latent_len)


def _converter():
    from mm.families.stepvideo.convert import StepVideoConverter

    return StepVideoConverter


SPEC = FamilySpec(name="stepvideo", predictors={"stepvideodit": (StepVideoDiT, StepVideoDiTConfig)},
                  recipe=StepVideoRecipe, sampler=StepVideoSampler, load_weights=_load_weights,
                  ae_model_ids=("stepvideovae",), num_text_encoders=2, text_encoders=stepvideo_text_encoder,
                  build_vae=_build_vae, vae_factors=_vae_factors, vae_channels=_vae_channels, frame_rule=_frame_rule,
                  tokenizer=stepvideo_tokenizer,
                  text_max_lengths=(STEP_LLM_MAX_LENGTH, CLIP_MAX_LENGTH), converter=_converter,
                  description="Step-Video-T2V", extra_checks=EXTRA_CHECKS,
                  weight_checks=WEIGHT_CHECKS, lora=STEPVIDEO_LORA)
