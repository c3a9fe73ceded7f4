#!/usr/bin/env bash
# One GPU window in one command (< 10 min): bash bench/gpu_run.sh [--dry-run] [--data DIR] [gpu_run.py options]
# Writes into $OUT (default out/gpu_run). Needs only PyTorch, NumPy, OpenCV, pyarrow, PyYAML, Typer; pydantic
# (for the job specs) is installed from carried wheels when missing: bench/wheels/ or $WHEELS, made with
#   pip download pydantic pydantic-core typing-extensions annotated-types typing-inspection --only-binary :all: \
#     --python-version 3.12 --platform manylinux2014_x86_64 -d bench/wheels
# (3.12: the GPU machines' Python, 2026-11; pydantic_core is compiled per Python version, so fetch the one
# matching `python3 --version` there; the wrong one fails here in one line before anything runs.)
# Carry: bench/wheels and the prepared dataset (data/300w by default, or pass --data DIR).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/out/gpu_run}"
export OUT
mkdir -p "$OUT"
PKG="$(mktemp -d)"
trap 'rm -rf "$PKG"' EXIT
ln -s "$REPO" "$PKG/flare"  # the repo root is the flare package
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --find-links "${WHEELS:-$REPO/bench/wheels}" --target "$PKG/site" pydantic
  export PYTHONPATH="$PYTHONPATH:$PKG/site"
fi
"$PY" "$REPO/bench/gpu_run.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_run.log"
