"""Weight conversion between HuggingFace-format checkpoints and mm's TP/PP/VPP shards (mm-convert)."""
