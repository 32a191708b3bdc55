"""A toy model family, registered from the test tree the way a family outside mm registers: through
the ``mm.families`` entry-point group (``tests/toy_family/plugin.py`` writes the distribution
metadata). Two specs:

- ``SPEC`` (``toy``, predictor ``toy_dit``): a tiny DiT on the shared pipelined-DiT shell, an
  identity-like AE (``ToyAE``), one text encoder;
- ``SPEC_TWO`` (``toy2``, predictor ``toy_dit2``): the same DiT reading two text encoders together.

With ``TOY_FAMILY_TRACE`` set to a directory, the DiT appends to ``<dir>/rank<R>.jsonl`` what it
received on each forward (the width and length of each text context), so a test can see that every
encoder's output reached it through the real entry points.
"""

from mm.families.spec import FamilySpec
from tests.toy_family.model import ToyAE, ToyDiT, ToyDiTConfig
from tests.toy_family.recipe import ToyRecipe, ToySampler


def _no_release_weights(chunk, source, tp_size: int, tp_rank: int) -> None:
    raise ValueError("the toy family has no release weights: leave predictor.from_pretrained out")


def _vae(ae, dtype):
    return ToyAE(dtype)


SPEC = FamilySpec(name="toy", predictors={"toy_dit": (ToyDiT, ToyDiTConfig)}, recipe=ToyRecipe, sampler=ToySampler,
                  load_weights=_no_release_weights, ae_model_ids=("toy_ae",), build_vae=_vae,
                  vae_factors=lambda ae: (ToyAE.cfg.scale_factor_spatial, ToyAE.cfg.scale_factor_temporal),
                  description="a test family: tiny DiT, identity-like AE, one text encoder")

SPEC_TWO = FamilySpec(name="toy2", predictors={"toy_dit2": (ToyDiT, ToyDiTConfig)}, recipe=ToyRecipe,
                      sampler=ToySampler, load_weights=_no_release_weights, ae_model_ids=("toy_ae",), build_vae=_vae,
                      vae_factors=SPEC.vae_factors, num_text_encoders=2,
                      description="a test family: the toy DiT reading two text encoders")
