#!/usr/bin/env bash
# Install liverseg with its test tools into the current Python environment, then run the
# test suite (CPU only, tiny sizes), one pytest-xdist worker per core (`-n 0` runs it in one
# process). Extra arguments go to pytest, e.g. `-k build -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/python.sh
echo "==> installing liverseg and test tools into $("$PY" -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install --quiet --disable-pip-version-check --progress-bar off -e ".[dev]"
echo "==> running the tests"
"$PY" -m pytest -q -ra -n auto --dist worksteal "$@"
