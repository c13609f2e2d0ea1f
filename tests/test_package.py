"""The installed package is a real one: version defined once, type hints shipped, the command installed.

Runs in the development environment (editable install) and, from scripts/package_check.sh, against the wheel
installed into a fresh virtual environment (NEURALODE_EXPECT_INSTALLED_IN names it; there the package must
not come from the repository's src/).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import neuralode


def test_imported_from_the_expected_place():
    expected = os.environ.get("NEURALODE_EXPECT_INSTALLED_IN")
    if not expected:
        pytest.skip("only when scripts/package_check.sh runs the tests against the installed wheel")
    location = Path(neuralode.__file__).resolve()
    assert location.is_relative_to(Path(expected).resolve()), f"neuralode imported from {location}"


def test_version_is_defined_once():
    # pyproject.toml reads neuralode.__version__ ([tool.setuptools.dynamic]); the metadata must agree
    assert importlib.metadata.version("neuralode") == neuralode.__version__
    parts = neuralode.__version__.split(".")
    assert len(parts) >= 3 and all(p.isdigit() for p in parts[:3]), neuralode.__version__


def test_type_hints_are_shipped():
    assert (Path(neuralode.__file__).parent / "py.typed").is_file()


def test_metadata():
    meta = importlib.metadata.metadata("neuralode")
    assert meta["Name"] == "neuralode"
    assert meta.get("License-Expression") == "MIT"
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta.get_all("Classifier"))
    extras = set(meta.get_all("Provides-Extra") or ())
    assert {"experiments", "test", "bench", "docs"} <= extras, extras
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("hypothesis") and 'extra == "test"' in r for r in requires)
    assert any(r.startswith("torch") and "extra" not in r for r in requires)


def test_command_is_installed():
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "neuralode"]
    assert script.value == "neuralode.cli:main"
    assert callable(script.load())


@pytest.mark.slow
def test_command_version():
    from neuralode.cli import build_parser

    parser = build_parser()
    if not any(a.option_strings == ["--version"] or "--version" in a.option_strings for a in parser._actions):
        pytest.skip("`neuralode --version` is not in neuralode/cli.py yet")
    out = subprocess.run(
        [sys.executable, "-m", "neuralode.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"neuralode {neuralode.__version__}"
