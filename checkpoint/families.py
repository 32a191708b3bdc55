"""What the shared sources and writers need to know about one model family's DiT weights.

A converter (``checkpoint/wan.py``, ``checkpoint/opensoraplan.py``) describes its model with one
``ModelWeights``: the model's name table (``mm/models/predictor/<model>/weights.py``) and the few
things a table does not say (which tensors the last pipeline stage holds, how config.json maps to
the predictor config mm records in its checkpoints and back). Everything else (reading safetensors
and mm checkpoints, TP/PP/VPP splitting, staging the target) is shared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

# a source tensor's shape, or None when the source does not hold it
ShapeOf = Callable[[str], Optional[list[int]]]


@dataclass(frozen=True)
class ModelWeights:
    """One model family's weights.

    Args:
        name: the model in messages ("Wan DiT").
        table: the name table's rows: ``.mm`` (a template, ``{i}`` a layer number), ``.split``
            ("column", "row" or None), ``.fused_parts`` and ``.sources(fmt)`` (the HF-side templates).
        rule_for: an mm key -> (its row, the placeholder values); WeightMappingError for a key without one.
        detect_format: the HF-side key names -> their format (one the rows' ``sources`` know).
        hf_format: the format mm_to_hf writes.
        head_prefixes: mm keys (outside the layers) that the last pipeline stage holds; the other
            non-layer keys sit on the first.
        read_arch: (config.json, format, ShapeOf, config.json's path for messages) -> the predictor
            config mm records in a checkpoint's header (``extra.predictor``, the model JSON's
            predictor keys); ConvertError when the config is incomplete or disagrees with the weights.
        hf_config: a recorded predictor config -> the config.json mm_to_hf writes.
        ignored_source_keys: format -> patterns of HF-side tensors that have no counterpart in mm.
        expected_keys: a predictor config -> every mm key of the whole model; when given, an HF
            source must hold exactly these (else rows whose tensors are all absent are optional).
    """

    name: str
    table: Sequence[Any]
    rule_for: Callable[[str], tuple[Any, dict[str, str]]]
    detect_format: Callable[[Any], str]
    hf_format: str
    head_prefixes: tuple[str, ...]
    read_arch: Callable[[dict, str, ShapeOf, str], dict[str, Any]]
    hf_config: Callable[[dict[str, Any]], dict[str, Any]]
    ignored_source_keys: dict[str, tuple[re.Pattern, ...]] = field(default_factory=dict)
    expected_keys: Optional[Callable[[dict[str, Any]], list[str]]] = None

    def is_head(self, mm_key: str) -> bool:
        return not mm_key.startswith("blocks.") and mm_key.startswith(self.head_prefixes)

    def source_layer_pattern(self, fmt: str) -> re.Pattern:
        """Matches an HF-side layer tensor of ``fmt`` and captures its layer number (the prefixes
        before ``{i}`` in the table's layer rows: ``blocks.``, ``transformer_blocks.`` ...)."""
        prefixes = sorted({s.split("{i}")[0] for rule in self.table if "{i}" in rule.mm
                           for s in rule.sources(fmt)})
        return re.compile("^(?:" + "|".join(map(re.escape, prefixes)) + r")(\d+)\.")
