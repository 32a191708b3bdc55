"""``mm-plan``: which TP/CP/PP/VPP/DP layout to train a model with on a given cluster. It enumerates
the layouts the training entry points accept (the same validation), and for each the per-rank memory
of the model's state (``mm.plan.memory``, exact)."""
