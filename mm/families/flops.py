"""What the families' FLOP counts share: the training count from a forward's parts, with what
activation recompute runs again in the backward."""

from __future__ import annotations

RECOMPUTE_CHOICES = ("full", "selective")
# the parts of a forward (as the families' ``*_forward_flops`` name them) that belong to the layers
LAYER_PARTS = ("self_attention_linear", "self_attention_core", "cross_attention_linear", "cross_attention_core",
               "ffn")


def training_flops(parts: dict[str, int], num_layers: int, recompute: str | None = None,
                   recompute_layers: int | None = None) -> int:
    """FLOPs of forward + backward: 3x the forward's ``parts`` (model FLOPs), plus, with ``recompute``
    (None, "full" or "selective", as --recompute-granularity), what the backward runs again for a
    hardware count: "full" the forward of ``recompute_layers`` layers (default all), "selective" the
    attention products of every layer."""
    total = 3 * sum(parts.values())
    if recompute is None:
        return total
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute = {recompute!r}; valid: None, {', '.join(RECOMPUTE_CHOICES)}")
    if recompute == "selective":
        if recompute_layers is not None:
            raise ValueError("recompute_layers is for recompute='full'; selective recompute covers every layer")
        return total + parts["self_attention_core"] + parts["cross_attention_core"]
    layers = num_layers if recompute_layers is None else recompute_layers
    if not 0 <= layers <= num_layers:
        raise ValueError(f"recompute_layers = {layers}; valid: 0 to predictor.num_layers = {num_layers}")
    return total + sum(parts[p] for p in LAYER_PARTS) * layers // num_layers
