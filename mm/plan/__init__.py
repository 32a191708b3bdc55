"""``mm-plan``: which TP/CP/PP/VPP/DP layout to train a model with on a given cluster. It enumerates
the layouts the training entry points accept (the same validation), and for each the per-rank memory
of the model's state (``mm.plan.memory``, exact) and, from a calibration, activations and the time of
an iteration with its communication (``mm.plan.estimate``, ``mm.plan.comm``)."""
