#!/usr/bin/env bash
# Install everything into .venv (torch pinned by constraints.txt) and run the main demo on generated data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "experiments"
exec .venv/bin/neuralode demo "$@"
