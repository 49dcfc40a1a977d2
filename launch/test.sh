#!/usr/bin/env bash
# Install liverseg with its test tools into the current Python environment, then run the
# test suite (CPU only, tiny sizes), one pytest-xdist worker per core (`-n 0` runs it in one
# process). Extra arguments go to pytest, e.g. `-k build -x`. The install is skipped when
# this environment already has this checkout installed with the same pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/python.sh
prefix=$("$PY" -c 'import sys; print(sys.prefix)')
want="$prefix $(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp=build/test-install.stamp
here=$("$PY" -c 'import os, sys; sys.path.pop(0); import liverseg; print(os.path.dirname(os.path.dirname(liverseg.__file__)))' 2>/dev/null || true)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ "$here" != "$(pwd)" ]; then
  echo "==> installing liverseg and test tools into $prefix"
  "$PY" -m pip install --quiet --disable-pip-version-check --progress-bar off -e ".[dev]"
  mkdir -p build && echo "$want" > "$stamp"
fi
echo "==> running the tests"
"$PY" -m pytest -q -ra -n auto --dist worksteal "$@"
