"""``predictor.pipeline_num_layers`` (and mm-convert's ``pp_layers``): layers per pipeline stage, or
per virtual chunk and stage, read and checked against the parallel sizes and the layer count. The
configuration, the model builder (``mm.models.predictor.pipeline``) and mm-convert use the same two
functions."""

from __future__ import annotations

from typing import Any, Sequence

KEY = "predictor.pipeline_num_layers"


def pipeline_rows(value: Any, least: int = 0) -> list[list[int]]:
    """``predictor.pipeline_num_layers`` (or mm-convert's ``pp_layers``) as rows ``[chunk][stage]``:
    a 1-D list (layers per stage) is one row, a 2-D list has one row per virtual chunk. ValueError,
    saying what is valid (the caller names the key), unless it is a non-empty list of integer
    counts >= ``least``, or a list of such lists of one length."""
    lists = (list, tuple)
    rows = None
    if isinstance(value, lists) and value:
        if all(isinstance(row, lists) for row in value):
            rows = [list(row) for row in value]
        elif not any(isinstance(row, lists) for row in value):
            rows = [list(value)]
    if rows is None or any(not row or len(row) != len(rows[0]) for row in rows) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= least for row in rows for n in row):
        raise ValueError(f"expected a non-empty list of layer counts (>= {least}) per pipeline stage, e.g. "
                         "[8, 8, 8, 8], or per virtual chunk and stage (rows of one length), e.g. [[4, 4], [4, 4]]")
    return rows


def pipeline_layers_problems(value: Sequence, num_layers: int | None, pp: int, vpp: int | None,
                             key: str = KEY) -> list[str]:
    """What keeps ``value`` (a valid ``pipeline_rows`` input) from describing ``pp`` pipeline stages
    (--pipeline-model-parallel-size) x ``vpp`` virtual chunks (--virtual-pipeline-model-parallel-size,
    None: no interleaving) of ``num_layers`` layers (None: not checked); empty when it fits."""
    rows = pipeline_rows(value)
    if isinstance(value[0], (list, tuple)):
        if len(rows) != (vpp or 1) or len(rows[0]) != pp:
            return [f"{key} = {value}: a 2-D layout needs {vpp or 1} row(s) (--virtual-pipeline-model-parallel-size) "
                    f"of {pp} stage(s) each (--pipeline-model-parallel-size)"]
    elif vpp is not None:
        return [f"{key} = {value} is 1-D but --virtual-pipeline-model-parallel-size is {vpp}; give {vpp} rows of {pp} "
                "stages, e.g. [[4, 4], [4, 4]]"]
    elif len(value) != pp:
        return [f"{key} = {value} has {len(value)} stage(s) but --pipeline-model-parallel-size is {pp}; the list needs "
                "one entry per pipeline stage"]
    total = sum(map(sum, rows))
    if num_layers is not None and total != num_layers:
        return [f"{key} = {value} sums to {total} layers but predictor.num_layers = {num_layers}"]
    return []
