#!/usr/bin/env bash
# Check a psiopt install on a GPU machine and write gpu-report.md (see scripts/gpu_check.py):
#   scripts/gpu_check.sh [--report FILE] [--workdir DIR] [--device cuda:N] [--no-install] [--dry-run]
# Uses $PYTHON, else .venv/bin/python, else python3.  Exit status 0 only if every step passed; a
# machine without CUDA, a skipped CUDA test or a failed step exits 1 with a one-line reason.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
exec "$PY" scripts/gpu_check.py "$@"
