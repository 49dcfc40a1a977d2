#!/usr/bin/env bash
# The main job on built-in CT phantoms, end to end: install, generate phantom cases, build
# WebDataset shards, inspect them. A second run reuses what is already built.
#
#   bash launch/demo.sh [--out DIR] [--cases N] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=demo-out
CASES=12
SIZE=128
SLICES=32,48
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --cases) CASES=$2; shift 2 ;;
    --quick) CASES=4; SIZE=64; SLICES=12,20; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

if ! "$PY" -c "import shardgen, torch, webdataset, zstandard, isal" 2>/dev/null; then
  echo "==> installing liverseg (first run only; torch is large, a few minutes)"
  "$PY" -m pip install --quiet --disable-pip-version-check --progress-bar off -e .
fi
echo "==> demo on $CASES phantom cases at ${SIZE}x${SIZE} into $OUT (about a minute on 2 cores)"

PHANTOMS="$OUT/phantoms-${SIZE}px"
SHARDS="$OUT/shards-${SIZE}px"
if [[ $(ls "$PHANTOMS"/volume-*.nii.gz 2>/dev/null | wc -l) -eq $CASES ]]; then
  echo "==> phantoms: reusing $PHANTOMS"
else
  rm -rf "$PHANTOMS"
  "$PY" -m shardgen.cli phantom --out "$PHANTOMS" --cases "$CASES" --size "$SIZE" --slices "$SLICES"
fi
"$PY" -m shardgen.cli build --input "$PHANTOMS" --out "$SHARDS" --size "$SIZE" --workers 2
"$PY" -m shardgen.cli inspect "$SHARDS"
echo "==> done: shards and manifest.json in $SHARDS, sample grid $SHARDS/inspect.png"
