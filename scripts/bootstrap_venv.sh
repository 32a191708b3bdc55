#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment at <repo>/.venv with Python 3.12 and
# installs the pinned requirements plus mm itself in editable mode. Idempotent: a stamp file
# records a hash of everything that decides the install, and a second run with the same inputs
# does nothing. Source it (it exports MM_PYTHON) or run it.
#
#   MM_PYTHON_BIN=/path/to/python3.12   use this interpreter to create the venv
#   MM_VENV=/path/to/venv               use another venv location
#   MM_BOOTSTRAP_EXTRAS="test"          also install requirements/<extra>.txt (space separated)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MM_VENV:-$repo/.venv}"
extras="${MM_BOOTSTRAP_EXTRAS:-}"

is_py312() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1
}

find_python312() {
    local cand
    if [[ -n "${MM_PYTHON_BIN:-}" ]]; then
        if is_py312 "$MM_PYTHON_BIN"; then echo "$MM_PYTHON_BIN"; return 0; fi
        echo "bootstrap: MM_PYTHON_BIN=$MM_PYTHON_BIN is not a Python 3.12 interpreter" >&2
        return 1
    fi
    for cand in python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
                "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
        [[ -n "$cand" ]] || continue
        if command -v "$cand" >/dev/null 2>&1 && is_py312 "$cand"; then
            command -v "$cand"; return 0
        fi
    done
    echo "bootstrap: no Python 3.12 found (looked for python3.12 on PATH and in pyenv's versions)." >&2
    echo "bootstrap: install one (e.g. 'pyenv install 3.12') or set MM_PYTHON_BIN." >&2
    return 1
}

stamp_inputs() {
    cat "$repo/setup.py" "$repo"/requirements/*.txt
}

if [[ -x "$venv/bin/python" ]] && ! is_py312 "$venv/bin/python"; then
    echo "bootstrap: $venv holds a Python other than 3.12; recreating it" >&2
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    py="$(find_python312)"
    echo "bootstrap: creating $venv with $py"
    "$py" -m venv "$venv"
fi

# the stamp: the inputs' hash, then the extras installed with them; a run asking for no extra beyond those
# (the quickstart's none, after the tests' "test") installs nothing
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
read -r have installed 2>/dev/null < "$venv/.mm-bootstrap-stamp" || true
[[ "${have:-}" == "$want" ]] || installed=""
missing=""
for extra in $extras; do
    [[ " ${installed:-} " == *" $extra "* ]] || missing="$missing $extra"
done
if [[ "${have:-}" != "$want" || -n "$missing" ]]; then
    extras="$(echo ${installed:-} $extras | tr ' ' '\n' | sort -u | tr '\n' ' ')"
    reqs=(-r "$repo/requirements/runtime.txt")
    for extra in $extras; do
        [[ -f "$repo/requirements/$extra.txt" ]] || { echo "bootstrap: no requirements/$extra.txt for extra '$extra'" >&2; exit 1; }
        reqs+=(-r "$repo/requirements/$extra.txt")
    done
    echo "bootstrap: installing pinned requirements into $venv (first run downloads torch, a few minutes)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$repo/requirements/constraints.txt" "${reqs[@]}"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation -e "$repo"
    echo "$want $extras" > "$venv/.mm-bootstrap-stamp"
fi
export MM_PYTHON="$venv/bin/python"
