import os
import sys
import warnings

import pytest
import torch

torch.set_num_threads(1)

# the shared references (helpers.py) import from every subfolder, also from a copy of tests/ elsewhere
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# test modules that compile throughout: every test in them is marked `compile` (and so `slow`)
_COMPILE_MODULES = {"test_compiled.py", "test_compile_cache.py", "test_small_gemm.py"}


def pytest_configure(config):
    # registered here rather than in pyproject.toml: the package check runs a copy of tests/ without it
    config.addinivalue_line(
        "markers", "slow: takes seconds (training runs, subprocesses, compiling); -m 'not slow' leaves them out"
    )
    config.addinivalue_line("markers", "compile: goes through torch.compile (every such test is also slow)")


def pytest_collection_modifyitems(config, items):
    """Tests of the compiled paths (by module, or by a name that says so) get the `compile` and `slow`
    markers, so that `pytest -m "not slow"` is the quick check and `pytest -m compile` runs them alone."""
    for item in items:
        if item.path.name in _COMPILE_MODULES or "compile" in item.name:
            item.add_marker(pytest.mark.compile)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAST: list = []


@pytest.fixture(autouse=True)
def _working_directory_exists(request):
    """Some compiled-path tests can leave the process in a working directory that no longer exists (a deleted
    temporary folder), which breaks every later test that reads it (``os.getcwd``, subprocesses, MKL's
    loader): start each test from the repository root in that case, naming the test that left it."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(ROOT)
        warnings.warn(
            f"the working directory was deleted during {_LAST[-1] if _LAST else 'an earlier test'}", stacklevel=2
        )
    _LAST[:] = [request.node.nodeid]
    yield
