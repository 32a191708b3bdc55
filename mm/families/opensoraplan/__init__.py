"""The Open-Sora-Plan v1.3 family: the sparse DiT (``videoditsparse`` T2V, ``videoditsparsei2v`` I2V),
WFVAE and mT5."""

from mm.families.opensoraplan import mindspeed
from mm.families.opensoraplan.recipe import OpenSoraPlanRecipe
from mm.families.opensoraplan.sampler import OpenSoraPlanSampler
from mm.families.spec import FamilySpec
from mm.models.predictor.opensoraplan import OpenSoraPlanDiT, OpenSoraPlanDiTConfig, OpenSoraPlanI2VConfig
from mm.models.predictor.opensoraplan.weights import OSP_LORA


def _load_weights(chunk, source, tp_size: int, tp_rank: int) -> None:
    from mm.models.predictor.opensoraplan.weights import load_reference_weights

    load_reference_weights(chunk, source, tp_size=tp_size, tp_rank=tp_rank)


def _vae_keys(config, arch) -> list[str]:
    """The WFVAE keys of the ``ae`` section, checked before anything starts (the VAE is built later)."""
    ae = config.model.ae
    if ae is None or ae.model_id != "wfvae":
        return []
    from mm.models.ae import WFVAEConfig

    try:
        WFVAEConfig.from_json(ae.params)
    except (TypeError, ValueError) as e:
        return [str(e)]
    return []


def _converter():
    from mm.families.opensoraplan.convert import OpenSoraPlanConverter

    return OpenSoraPlanConverter


SPEC = FamilySpec(name="opensoraplan",
                  predictors={"videoditsparse": (OpenSoraPlanDiT, OpenSoraPlanDiTConfig),
                              "videoditsparsei2v": (OpenSoraPlanDiT, OpenSoraPlanI2VConfig)},
                  recipe=OpenSoraPlanRecipe, sampler=OpenSoraPlanSampler, load_weights=_load_weights,
                  ae_model_ids=("wfvae",), converter=_converter, description="Open-Sora-Plan v1.3",
                  translate=mindspeed.translate, extra_checks=(_vae_keys,), lora=OSP_LORA)
