#!/usr/bin/env bash
# Install everything into .venv (torch pinned by constraints.txt) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "experiments,test"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} exec .venv/bin/python -m pytest tests "$@"
