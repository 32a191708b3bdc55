#!/usr/bin/env bash
# The test command: sets up .venv (Python 3.12, pinned requirements) and runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/unit -k arguments`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MM_BOOTSTRAP_EXTRAS="test" source "$repo/scripts/bootstrap_venv.sh"
cd "$repo"
set +e
"$MM_PYTHON" -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "tests/run.sh: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit $rc
