"""mm imports without the optional packages, and names devices only in its accelerator layer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPTIONAL = ("torch_npu", "apex", "transformer_engine", "flash_attn")


def test_import_mm_needs_no_optional_package():
    code = ("import sys, mm, mm.accelerator, mm.parallel, mm.arguments, mm.runtime; "
            f"print([m for m in {OPTIONAL!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_only_the_accelerator_layer_names_devices():
    pattern = re.compile(r"""["'](cuda|npu)["':]|torch\.(cuda|npu)\b|\.cuda\(""")
    offenders = []
    for path in (REPO / "mm").rglob("*.py"):
        if path.is_relative_to(REPO / "mm" / "accelerator"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names
