"""Throughput of a training iteration: TFLOP/s per device from the model FLOPs that each family's
recipe counts (``mm.families.<family>.flops``)."""

from __future__ import annotations


def tflops_per_device(flops_per_iteration: float, seconds: float, world_size: int) -> float:
    """TFLOP/s per device: an iteration's FLOPs over all ranks, its wall time, the number of ranks."""
    if seconds <= 0:
        raise ValueError(f"seconds = {seconds}: an iteration's time must be > 0")
    if world_size < 1:
        raise ValueError(f"world_size = {world_size}; valid: >= 1")
    return flops_per_iteration / (seconds * world_size * 1e12)
