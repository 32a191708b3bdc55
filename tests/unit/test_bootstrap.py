"""scripts/bootstrap_venv.sh's stamp: a run that asks for no requirement beyond what the venv has (the
quickstart's none after the tests' "test" extra) installs nothing; new inputs or a new extra install."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then exit 0; fi  # the version check: a Python 3.12
echo "$*" >> "$PIP_LOG"
"""


def _bootstrap(venv: Path, log: Path, extras: str) -> list[str]:
    env = dict(os.environ, MM_VENV=str(venv), PIP_LOG=str(log), MM_BOOTSTRAP_EXTRAS=extras)
    done = subprocess.run(["bash", str(REPO / "scripts/bootstrap_venv.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "No such file" not in done.stderr, done.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_the_stamp_keeps_extras_and_installs_only_what_is_missing(tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    first = _bootstrap(venv, log, "test")
    assert len(first) == 2 and "requirements/test.txt" in first[0] and "-e" in first[1]
    assert _bootstrap(venv, log, "") == first  # the quickstart's run: nothing to install
    assert _bootstrap(venv, log, "test") == first  # and the tests' again: nothing either
    stamp = (venv / ".mm-bootstrap-stamp").read_text().split()
    assert stamp[1:] == ["test"]
    (venv / ".mm-bootstrap-stamp").write_text("0" * 64 + " test\n")  # the pinned requirements changed
    again = _bootstrap(venv, log, "")
    assert len(again) == 4 and "requirements/test.txt" not in again[2]
