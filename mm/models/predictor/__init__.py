"""DiT predictors, built from megatron-core tensor-parallel layers. Which class a model JSON's
``predictor.model_id`` names is its family's spec (``mm.families``)."""
