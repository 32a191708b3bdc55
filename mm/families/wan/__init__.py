"""The Wan family: Wan2.1 / Wan2.2 DiTs (``wan_dit``: T2V, I2V, FLF2V, the A14B experts, TI2V-5B) and
Phantom subject-to-video, on the Wan VAE and UMT5."""

from mm.families.spec import FamilySpec, ReleaseConfig, default_text_encoder
from mm.families.wan import mindspeed, release
from mm.families.wan.recipe import WanRecipe
from mm.families.wan.sampler import WanSampler
from mm.models.predictor.wan import WanDiT, WanDiTConfig, load_hf_weights


def _load_weights(chunk, source, tp_size: int, tp_rank: int) -> None:
    load_hf_weights(chunk, source, tp_size=tp_size, tp_rank=tp_rank)


def _text_encoder(component, max_length: int, zero_padding: bool):
    """UMT5 (a transformers directory or Wan's models_t5_umt5-xxl-enc-bf16.pth), every prompt cleaned first as
    Wan's tokenizer wrapper does (``HuggingfaceTokenizer(..., clean='whitespace')``)."""
    from mm.models.text_encoder.prompt_clean import clean_prompt

    return default_text_encoder(component, max_length, zero_padding, clean=clean_prompt)


def _converter():
    from mm.families.wan.convert import WanConverter

    return WanConverter


SPEC = FamilySpec(name="wan", predictors={"wan_dit": (WanDiT, WanDiTConfig)}, recipe=WanRecipe, sampler=WanSampler,
                  load_weights=_load_weights, ae_model_ids=("wan_vae",), text_encoders=_text_encoder,
                  converter=_converter, description="Wan2.1 / Wan2.2 / Phantom",
                  release=ReleaseConfig(tasks=tuple(release.WAN_TASKS), expand=release.expand),
                  translate=mindspeed.translate)
