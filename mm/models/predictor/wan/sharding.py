"""The Wan DiT's distributed-checkpoint names: ``global_name`` (a stage's local name -> the
layout-free one). The sharded state dict itself is every DiT's, ``mm/models/predictor/sharding.py``."""

from mm.models.predictor.name_table import global_name

__all__ = ["global_name"]
