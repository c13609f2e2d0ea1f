#!/usr/bin/env bash
# Create .venv if needed and install the package with the given extras, torch pinned by constraints.txt.
# Usage: bash scripts/install.sh EXTRAS   (e.g. "experiments,test")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q "${FIND_LINKS[@]}" -c constraints.txt -e ".[$1]"
