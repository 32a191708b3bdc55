"""Parametrisation helpers shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def marked_extended(names: Iterable[str], extended: set[str]) -> list:
    """``names`` as parametrize values, those in ``extended`` carrying the ``extended`` marker (left out
    of the default run; see pytest.ini)."""
    unknown = extended - set(names := list(names))
    assert not unknown, f"extended names not among the parameters: {sorted(unknown)}"
    return [pytest.param(name, marks=pytest.mark.extended) if name in extended else name for name in names]
