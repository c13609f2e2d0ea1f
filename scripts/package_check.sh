#!/usr/bin/env bash
# Check the package a user installs: build the sdist and the wheel (the wheel from the sdist, as pip would),
# `twine check` both, look inside the wheel, install it (not editable) with the pinned torch into a fresh
# virtual environment in a temporary folder, and run the command and a fast subset of the tests against it,
# from a copy of the tests outside the repository so that src/ cannot be imported by accident.
# Usage: bash scripts/package_check.sh      (needs .venv with the `test` extra: build, twine; 2-3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV_PY=.venv/bin/python
FAST_TESTS=(tests/test_package.py tests/test_trust.py tests/test_interface.py tests/test_properties.py)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/neuralode-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

echo "package check: building sdist and wheel"
"$VENV_PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
"$VENV_PY" -m twine check --strict "$SDIST" "$WHEEL"

# what the wheel must (and must not) hold
"$VENV_PY" - "$WHEEL" "$SDIST" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
need = ["neuralode/__init__.py", "neuralode/py.typed", "neuralode/cli.py", "neuralode/solvers/tableaus.py",
        "neuralode/nn/block.py", "neuralode/models/cnf.py"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "wheel lacks the licence file"
stray = [n for n in names if n.split("/")[0] not in ("neuralode",) and ".dist-info/" not in n]
assert not stray, f"wheel holds files outside the package: {stray[:5]}"
meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
assert "License-Expression: MIT" in meta, "no License-Expression: MIT in METADATA"
members = tarfile.open(sdist).getnames()
assert any(m.endswith("/LICENSE") for m in members) and any(m.endswith("/src/neuralode/py.typed") for m in members)
print(f"package check: {wheel.rsplit('/', 1)[-1]}: {len(names)} files, py.typed and LICENSE included")
PY
echo "package check: wheel $(du -k "$WHEEL" | cut -f1) KiB, sdist $(du -k "$SDIST" | cut -f1) KiB"

echo "package check: installing the wheel into a fresh virtual environment"
"$PY" -m venv "$WORK/venv"
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
# the wheel and torch, plus what the subset of tests needs (scipy: the scipy_solver tests)
"$WORK/venv/bin/python" -m pip install -q "${FIND_LINKS[@]}" -c constraints.txt torch "$WHEEL" pytest hypothesis scipy

# run from the temporary folder: the repository (and its src/) is not on sys.path there
mkdir "$WORK/run"
cp -r tests "$WORK/run/tests"
rm -rf "$WORK/run/tests/__pycache__"
cd "$WORK/run"
"$WORK/venv/bin/neuralode" demo --help >/dev/null
location=$("$WORK/venv/bin/python" -c "import neuralode; print(neuralode.__file__)")
case "$location" in
    "$WORK/venv/"*) echo "package check: neuralode imported from $location" ;;
    *) echo "package check: neuralode imported from $location, not from the fresh environment" >&2; exit 1 ;;
esac
# (the property tests with 20 generated examples each instead of 200: this checks the installation)
NEURALODE_EXPECT_INSTALLED_IN="$WORK/venv" NEURALODE_PROPERTY_EXAMPLES=${NEURALODE_PROPERTY_EXAMPLES:-20} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider "${FAST_TESTS[@]}"
cd "$ROOT"
echo "package check: passed in $((SECONDS - start)) s"
