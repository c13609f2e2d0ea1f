"""The one cache type of the compiled paths: bounded (least recently used out first), guarded against reused
ids, with hit and miss counts users can read through ``neuralode.compiled.cache_info``."""

import warnings

import torch

import neuralode
import neuralode.compiled
from neuralode.compiled.cache import CompileCache, backend_of


def test_least_recently_used_entry_goes_first():
    c = CompileCache("test_lru", 2)
    a, b, d = object(), object(), object()
    c.put("a", 1, a)
    c.put("b", 2, b)
    assert c.get("a", a) == 1  # "a" is now the most recently used
    c.put("d", 3, d)
    assert c.get("b", b) is None and c.get("a", a) == 1 and c.get("d", d) == 3
    assert len(c) == 2
    info = c.info()
    assert (info.hits, info.misses, info.size, info.maxsize) == (3, 1, 2, 2)


def test_an_entry_is_a_hit_only_for_the_same_owners():
    """Keys hold id(func): a new func with a recycled id must not get the old func's compiled code."""
    c = CompileCache("test_owners", 4)
    f, g = object(), object()
    c.put(("k",), "compiled for f", f)
    assert c.get(("k",), g) is None
    assert c.get(("k",), f) == "compiled for f"
    assert c.get(("k",)) is None  # fewer owners than stored: a miss
    assert c.owned_by(f) == ["compiled for f"] and c.owned_by(g) == []


def test_backend_of_the_compile_option():
    assert backend_of(False) is None and backend_of(None) is None
    assert backend_of(True) == "inductor" and backend_of("aot_eager") == "aot_eager"


def test_a_repeated_compiled_solve_hits_the_cache():
    neuralode.compiled.clear_caches()
    f = torch.nn.Linear(3, 3).double()
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)

    def field(t, y):
        return torch.tanh(f(y))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback to eager)
        neuralode.solve(field, y0, t, compile="aot_eager")
        before = {k: (v.hits, v.misses) for k, v in neuralode.compiled.cache_info().items()}
        neuralode.solve(field, y0, t, compile="aot_eager")
    after = neuralode.compiled.cache_info()
    assert before["device_loop"][1] >= 1  # the first solve compiled the loop
    assert after["device_loop"].hits > before["device_loop"][0]
    assert after["device_loop"].misses == before["device_loop"][1]  # nothing compiled again
    assert all(v.size <= v.maxsize for v in after.values())
