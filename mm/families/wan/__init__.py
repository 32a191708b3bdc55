"""The Wan family: Wan2.1 / Wan2.2 DiTs (``wan_dit``: T2V, I2V, FLF2V, the A14B experts, TI2V-5B) and
Phantom subject-to-video, on the Wan VAE and UMT5."""

from mm.families.spec import FamilySpec, ReleaseConfig, default_text_encoder
from mm.families.wan import mindspeed, release
from mm.families.wan.recipe import WanRecipe
from mm.families.wan.sampler import WanSampler
from mm.models.predictor.wan import WanDiT, WanDiTConfig, load_hf_weights
from mm.models.predictor.wan.weights import WAN_LORA


def _load_weights(chunk, source, tp_size: int, tp_rank: int) -> None:
    load_hf_weights(chunk, source, tp_size=tp_size, tp_rank=tp_rank)


def _text_encoder(component, max_length: int, zero_padding: bool):
    """UMT5 (a transformers directory or Wan's models_t5_umt5-xxl-enc-bf16.pth), every prompt cleaned first as
    Wan's tokenizer wrapper does (``HuggingfaceTokenizer(..., clean='whitespace')``)."""
    from mm.models.text_encoder.prompt_clean import clean_prompt

    return default_text_encoder(component, max_length, zero_padding, clean=clean_prompt)


# the latent channels of Wan's release VAEs -> their (spatial, temporal) compression: Wan2.1's VAE (also
# Wan2.2-A14B's), Wan2.2-TI2V-5B's
RELEASE_VAE_FACTORS = {16: (8, 4), 48: (16, 4)}


def _known_vae_factors(model) -> tuple[int, int]:
    """The VAE's compression from the model JSON alone: the ``ae`` section's scale_factor_* keys, else the
    release VAE with the DiT's latent channels (``ae.z_dim``, else ``predictor.out_dim``)."""
    from mm.models.ae import WanVAEConfig

    ae = model.ae.params
    if "scale_factor_spatial" in ae and "scale_factor_temporal" in ae:
        vae = WanVAEConfig.from_json(ae)
        return vae.scale_factor_spatial, vae.scale_factor_temporal
    channels = ae.get("z_dim") or SPEC.arch(model.predictor).out_dim
    if channels not in RELEASE_VAE_FACTORS:
        raise ValueError(
            f"ae.from_pretrained = {model.ae.from_pretrained!r}: no config.json there, and {channels} latent channels "
            f"(ae.z_dim, else predictor.out_dim) are no Wan release VAE's (16: Wan2.1's, 8x spatial; 48: "
            "Wan2.2-TI2V-5B's, 16x); give ae.scale_factor_spatial and ae.scale_factor_temporal in the model JSON")
    return RELEASE_VAE_FACTORS[channels]


def _converter():
    from mm.families.wan.convert import WanConverter

    return WanConverter


SPEC = FamilySpec(name="wan", predictors={"wan_dit": (WanDiT, WanDiTConfig)}, recipe=WanRecipe, sampler=WanSampler,
                  load_weights=_load_weights, ae_model_ids=("wan_vae",), text_encoders=_text_encoder,
                  converter=_converter, description="Wan2.1 / Wan2.2 / Phantom",
                  release=ReleaseConfig(tasks=tuple(release.WAN_TASKS), expand=release.expand),
                  translate=mindspeed.translate, feature_predictor=mindspeed.feature_predictor, known_vae_factors=_known_vae_factors, lora=WAN_LORA)
