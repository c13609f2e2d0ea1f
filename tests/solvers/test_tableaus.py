"""Tableau identities and order conditions (Butcher's rooted trees), independent of the step code."""

import math
from fractions import Fraction

import numpy as np
import pytest

from neuralode.solvers.tableaus import TABLEAUS, ButcherTableau


def rooted_trees(order):
    """All rooted trees with `order` vertices, each a sorted tuple of child subtrees."""
    trees = {1: [()]}
    for n in range(2, order + 1):
        found = set()

        # a tree of n vertices: the root plus a multiset of subtrees whose sizes sum to n - 1
        def build(remaining, min_key, acc, found=found):
            if remaining == 0:
                found.add(tuple(sorted(acc)))
                return
            for size in range(1, remaining + 1):
                for sub in trees[size]:
                    key = (size, sub)
                    if key >= min_key:
                        build(remaining - size, key, acc + [sub], found)

        build(n - 1, (0, ()), [])
        trees[n] = sorted(found)
    return trees


def size(tree):
    return 1 + sum(size(c) for c in tree)


def gamma(tree):
    return size(tree) * math.prod(gamma(c) for c in tree)


def elementary_weight(tree, A, c):
    """Φ_i(t) for every stage i: the product over children of (A Φ(child))."""
    phi = np.ones(len(c))
    for child in tree:
        phi = phi * (A @ elementary_weight(child, A, c))
    return phi


def dense_A(tab):
    s = tab.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i, : len(row)] = row
    return A


EXPECTED_ORDER = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "adaptive_heun": 2,
    "fehlberg2": 2,
    "bosh3": 3,
    "dopri5": 5,
    "tsit5": 5,
    "dopri8": 8,
}
EMBEDDED_ORDER = {"adaptive_heun": 1, "fehlberg2": 1, "bosh3": 2, "dopri5": 4, "tsit5": 4, "dopri8": 7}


def test_number_of_rooted_trees_matches_oeis_a000081():
    trees = rooted_trees(8)
    assert [len(trees[n]) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_order_conditions_hold_up_to_the_method_order(name):
    tab = TABLEAUS[name]
    A, b, c = dense_A(tab), np.array(tab.b), np.array(tab.c)
    p = EXPECTED_ORDER[name]
    tol = 1e-14 if name not in ("tsit5", "dopri8") else 1e-11
    trees = rooted_trees(p + 1)
    for n in range(1, p + 1):
        for tree in trees[n]:
            lhs = b @ elementary_weight(tree, A, c)
            assert abs(lhs - 1 / gamma(tree)) < tol, (name, n, tree, lhs, 1 / gamma(tree))
    # and the order is not higher than claimed: some condition of order p+1 fails
    fails = [abs(b @ elementary_weight(t, A, c) - 1 / gamma(t)) for t in trees[p + 1]]
    assert max(fails) > 1e-8


@pytest.mark.parametrize("name", sorted(EMBEDDED_ORDER))
def test_embedded_solution_has_its_order(name):
    tab = TABLEAUS[name]
    A, c = dense_A(tab), np.array(tab.c)
    b_hat = np.array(tab.b) - np.array(tab.b_err)
    q = EMBEDDED_ORDER[name]
    tol = 1e-14 if name not in ("tsit5", "dopri8") else 1e-11
    trees = rooted_trees(q)
    for n in range(1, q + 1):
        for tree in trees[n]:
            assert abs(b_hat @ elementary_weight(tree, A, c) - 1 / gamma(tree)) < tol, (name, tree)


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_rows_sum_to_nodes_and_weights_to_one(name):
    tab = TABLEAUS[name]
    for i, row in enumerate(tab.a):
        assert math.isclose(sum(row), tab.c[i], abs_tol=1e-12)
    assert math.isclose(sum(tab.b), 1.0, abs_tol=1e-12)
    if tab.b_err is not None:
        assert abs(sum(tab.b_err)) < 1e-12


def test_fsal_is_derived_from_the_coefficients():
    assert TABLEAUS["dopri5"].fsal and TABLEAUS["tsit5"].fsal and TABLEAUS["bosh3"].fsal
    assert TABLEAUS["dopri8"].fsal  # the 14th row evaluates f(t0 + h, y1)
    assert not TABLEAUS["rk4"].fsal and not TABLEAUS["fehlberg2"].fsal and not TABLEAUS["adaptive_heun"].fsal


def test_invalid_tableau_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="row 1 of `a` sums"):
        ButcherTableau("bad", (0.0, 0.5), ((), (0.4,)), (0.0, 1.0), order=2)
    with pytest.raises(ValueError, match="sum to"):
        ButcherTableau("bad", (0.0, 0.5), ((), (0.5,)), (0.1, 1.0), order=2)


@pytest.mark.parametrize("name", ["dopri5", "tsit5", "dopri8"])
def test_continuous_extension_matches_weights_at_theta_one(name):
    W = TABLEAUS[name].interpolation_matrix("dense")
    assert np.allclose(W.sum(axis=1)[: TABLEAUS[name].stages], TABLEAUS[name].b, atol=1e-9)


def test_rational_coefficients_are_exact_for_dopri5():
    # 35/384 etc. must be stored as the nearest doubles of the exact fractions
    assert TABLEAUS["dopri5"].b[0] == float(Fraction(35, 384))
