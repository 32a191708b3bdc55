"""The layering of DESIGN.md, checked on the source: every import statement (at module level or
inside a function) of every module, read with ``ast``.

Rules (a module's package -> what it must not import):
- ``checkpoint/`` (mm-convert) and ``mm/inference``: not the training loop (``mm.training``);
- ``mm/models``: no loop (``mm.training``, ``mm.inference``), no family (``mm.families``);
- ``mm/parallel``: no model (``mm.models``) and nothing above it;
- ``mm/diffusion``: no parallel code (``mm.parallel``), no model, no loop;
- ``mm/data``: no model, no loop, no family;
- ``mm/ckpt`` (the checkpoint format): no loop, no mm-convert code;
- ``mm/families``: no loop (a family is below the loops that consume it);
- ``mm`` as a whole: no mm-convert code (``checkpoint``) outside a family's converter
  (``mm/families/<family>/convert.py``, which only mm-convert imports);
- shared code (the loops, mm-convert, ``mm/arguments``): no family folder (``mm.families.<name>``)
  and no family's own model package (``mm.models.predictor.<name>``), only the registry
  (``mm.families``) and its spec.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAMILY_FOLDERS = tuple(f"mm.families.{p.name}" for p in (REPO / "mm" / "families").iterdir() if p.is_dir()
                       and (p / "__init__.py").is_file())
# each family's own model code (its DiT, weight table, VAE): shared code reaches it through the spec
FAMILY_MODELS = FAMILY_FOLDERS + tuple(f"mm.models.predictor.{p.name}" for p in (REPO / "mm/models/predictor").iterdir()
                                       if p.is_dir() and (p / "__init__.py").is_file())
LOOPS = ("mm.training", "mm.inference")

# (where, forbidden prefixes, why[, files under ``where`` the rule exempts, as a glob])
RULES = [
    ("checkpoint", ("mm.training",), "mm-convert reads and writes checkpoints through mm.ckpt, not the loop"),
    ("mm/inference", ("mm.training",), "inference does not depend on the training loop"),
    ("mm/models", LOOPS + ("mm.families",), "models are below the loops and the families"),
    ("mm/parallel", ("mm.models", "mm.diffusion", "mm.data", "mm.families") + LOOPS, "parallel code imports no model"),
    ("mm/diffusion", ("mm.parallel", "mm.models", "mm.data", "mm.families") + LOOPS, "diffusion is pure tensor math"),
    ("mm/data", ("mm.models", "mm.families") + LOOPS, "data imports no model"),
    ("mm/ckpt", LOOPS + ("checkpoint", "mm.families"), "the checkpoint format is below the loops and mm-convert"),
    ("mm/families", LOOPS, "families are below the loops that consume them"),
    ("mm", ("checkpoint",), "only a family's converter builds on mm-convert's code", "families/*/convert.py"),
    ("mm/training", FAMILY_MODELS, "shared code asks the spec, never a family's own modules"),
    ("mm/inference", FAMILY_MODELS, "shared code asks the spec, never a family's own modules"),
    ("mm/plan", FAMILY_MODELS, "shared code asks the spec, never a family's own modules"),
    ("mm/arguments", FAMILY_FOLDERS + ("mm.models", "mm.families") + LOOPS, "configuration is below everything"),
    ("checkpoint", FAMILY_MODELS, "mm-convert finds converters and weight tables through the registry"),
]


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``; relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def violations(root: Path, rules=RULES) -> list[str]:
    """Every import under ``root`` that breaks a rule, as ``file:line imports X (why)``."""
    problems = []
    for where, forbidden, why, *exempt in rules:
        for path in sorted((root / where).rglob("*.py")):
            if exempt and path.relative_to(root / where).match(exempt[0]):
                continue
            for line, module in imported_modules(path, root):
                if any(module == f or module.startswith(f + ".") for f in forbidden):
                    problems.append(f"{path.relative_to(root)}:{line} imports {module} ({why})")
    return sorted(set(problems))


def test_the_code_keeps_the_layers():
    assert FAMILY_FOLDERS, "no family folder found under mm/families"
    assert violations(REPO) == []


@pytest.mark.parametrize("where, statement", [
    ("mm/inference/extra.py", "from mm.training.pretrain import pretrain"),
    ("checkpoint/extra.py", "import mm.training.checkpointing"),
    ("mm/parallel/extra.py", "def f():\n    from mm.models.predictor import dit"),
    ("mm/diffusion/extra.py", "from mm.parallel import state"),
    ("mm/data/extra.py", "from mm.models.ae import load_vae"),
    ("mm/training/extra.py", "from mm.families.wan.recipe import WanRecipe"),
    ("mm/inference/extra.py", "from mm.models.predictor.opensoraplan.weights import OSP_WEIGHTS"),
    ("mm/models/predictor/extra.py", "from ...training import pretrain"),
    ("mm/ckpt/extra.py", "from checkpoint.sources import HFSource"),
    ("mm/families/wan/extra.py", "from checkpoint.converter import DiTConverter"),
])
def test_a_forbidden_import_is_found(tmp_path, where, statement):
    """The check on a copy of the tree with one bad module added: it names that module and line."""
    for top in ("mm", "checkpoint"):
        for path in (REPO / top).rglob("*.py"):
            target = tmp_path / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    before = set(violations(tmp_path))
    (tmp_path / where).write_text(f'"""A module that breaks the layering."""\n{statement}\n')
    found = sorted(set(violations(tmp_path)) - before)
    assert found and all(p.startswith(where + ":") for p in found), found
