"""Distribution metadata that registers the toy families through the ``mm.families`` entry-point
group, as an installed package outside mm would: ``install(directory)`` writes a ``*.dist-info``
there; put the directory on PYTHONPATH (with the repository, for ``tests.toy_family``)."""

from __future__ import annotations

from pathlib import Path


def install(directory: Path) -> Path:
    info = Path(directory) / "mm_toy_family-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mm-toy-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mm.families]\ntoy = tests.toy_family:SPEC\n"
                                           "toy2 = tests.toy_family:SPEC_TWO\n")
    return Path(directory)
