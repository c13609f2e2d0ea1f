import os
import warnings

import pytest
import torch

torch.set_num_threads(1)


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
