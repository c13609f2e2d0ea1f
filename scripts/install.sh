#!/usr/bin/env bash
# Create .venv if needed and install the package (editable) with the given extras, torch pinned by
# constraints.txt (the CPU build, from /opt/wheels where that folder exists).
# Usage: bash scripts/install.sh [EXTRAS]   (default "experiments,test,docs"; e.g. "experiments")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-experiments,test,docs}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q "${FIND_LINKS[@]}" -c constraints.txt -e ".[$EXTRAS]"
