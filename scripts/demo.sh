#!/usr/bin/env bash
# Install everything into .venv (torch pinned by constraints.txt) and run the main demo on generated data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "experiments"
# Fashion-MNIST for `neuralode classify --dataset fashion-mnist` (Debian package; optional, never needed by tests)
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "note: could not install dataset-fashion-mnist"
fi
exec .venv/bin/neuralode demo "$@"
