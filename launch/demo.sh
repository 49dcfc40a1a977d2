#!/usr/bin/env bash
# The main job on built-in CT phantoms, end to end: install, generate phantom cases, build
# WebDataset shards, train a U-Net and a ResUNet, evaluate each, their ensemble and the
# postprocessed ensemble on held-out cases, and print the scores and the report's path.
# A second run reuses what is already built.
#
#   bash launch/demo.sh [--out DIR] [--cases N] [--quick] [--device auto|cpu|cuda] [--seed S]
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/python.sh
case "${1:-}" in
  -h|--help) sed -n '2,7p' "$0"; exec "$PY" launch/demo.py --help 2>/dev/null || exit 0 ;;
esac
if ! "$PY" -c "import shardgen, liverseg.evaluate, torch, webdataset, zstandard, isal, cc3d" 2>/dev/null; then
  echo "==> installing liverseg (first run only; torch is large, a few minutes)"
  "$PY" -m pip install --quiet --disable-pip-version-check --progress-bar off -e .
fi
exec "$PY" launch/demo.py "$@"
