"""benchmarks/stiff.py gives scipy's implicit methods the analytic Jacobian, as neuralode's get one."""

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("scipy.integrate")

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "stiff.py"
_spec = importlib.util.spec_from_file_location("stiff_benchmark", _PATH)
stiff = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stiff)

RATES = np.array([[0.04, 1e4, 3e7], [0.05, 2e4, 2e7]])
T_EVAL = np.array([0.0, 1e-2, 1.0, 1e2, 1e4])


def test_analytic_jacobian_matches_finite_differences():
    f, jac = stiff.robertson_np(RATES[0])
    y = np.array([0.7, 2e-5, 0.3])
    eps = 1e-7 * np.maximum(np.abs(y), 1e-6)
    fd = np.stack([(np.array(f(0, y + e)) - np.array(f(0, y - e))) / (2 * h) for h, e in zip(eps, np.diag(eps))], 1)
    np.testing.assert_allclose(jac(0, y), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", stiff.SCIPY_METHODS)
def test_scipy_implicit_methods_get_jac(monkeypatch, method):
    seen = []
    real = stiff.solve_ivp

    def spy(*args, **kwargs):
        seen.append(kwargs.get("jac"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stiff, "solve_ivp", spy)
    ys, nfev, njev, _ = stiff.run_scipy(RATES, T_EVAL, method, rtol=1e-6, atol=1e-10)
    assert len(seen) == len(RATES) and all(callable(j) for j in seen)
    assert ys.shape == (2, len(T_EVAL), 3) and njev > 0
    # the same solutions as with scipy's finite-difference Jacobian, within the tolerance
    ys_fd = stiff.run_scipy(RATES, T_EVAL, method, rtol=1e-6, atol=1e-10, jacobian=False)[0]
    assert len(seen) == 2 * len(RATES) and seen[-1] is None
    np.testing.assert_allclose(ys, ys_fd, rtol=1e-4, atol=1e-8)
