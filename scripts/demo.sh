#!/usr/bin/env bash
# Install everything into .venv (torch pinned by constraints.txt) and run the main demo on generated data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q "${FIND_LINKS[@]}" -c constraints.txt -e ".[experiments]"
exec .venv/bin/neuralode demo "$@"
