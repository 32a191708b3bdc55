"""Layer 6: the training loop (megatron-core schedules, DDP, distributed optimizer)."""
