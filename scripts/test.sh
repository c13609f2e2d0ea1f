#!/usr/bin/env bash
# The one test command (CI runs it through .ci/run): install everything into .venv (torch pinned by
# constraints.txt), run the whole test suite, build the documentation with warnings as errors, and check the
# package (sdist and wheel built, checked, installed into a fresh environment and tested there).
# Arguments go to pytest, e.g. `bash scripts/test.sh -x` (test paths given replace the whole suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "experiments,test,docs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# no test paths given: pytest runs testpaths = ["tests"] of pyproject.toml, the whole suite
.venv/bin/python -m pytest "$@"

SITE=$(mktemp -d "${TMPDIR:-/tmp}/neuralode-site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
start=$SECONDS
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$SITE"
echo "docs: mkdocs build --strict passed in $((SECONDS - start)) s"

bash scripts/package_check.sh
