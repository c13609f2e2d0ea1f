"""One bounded cache type for compiled functions, the parsing of the ``compile`` option, and the one-line
fallback warning: shared by every compiled path (fused steps, the device loop, the per-sample replay, the
compiled Rosenbrock step, the adjoint's compiled backward)."""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from typing import Any, Callable, Hashable

__all__ = ["CompileCache", "CacheInfo", "cache_info", "clear_caches", "backend_of", "warn_fallback"]


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """Counts of one cache: ``hits`` and ``misses`` since the process started (or ``clear_caches``), the
    number of entries held (``size``) and the most it holds (``maxsize``); the least recently used entry is
    dropped first."""

    name: str
    hits: int
    misses: int
    size: int
    maxsize: int


_ALL: list["CompileCache"] = []


class CompileCache:
    """A least-recently-used cache of at most ``maxsize`` entries.

    Keys usually hold ``id(func)``: an id can be reused once its object is gone, so an entry also keeps its
    *owners* (the func, the tableau) and is a hit only when the owners given on lookup are the same objects.
    """

    def __init__(self, name: str, maxsize: int) -> None:
        self.name, self.maxsize = name, int(maxsize)
        self._data: OrderedDict = OrderedDict()
        self.hits = self.misses = 0
        _ALL.append(self)

    def get(self, key: Hashable, *owners: Any) -> Any:
        """The value under ``key`` if its owners are ``owners``, else None (a miss)."""
        entry = self._data.get(key)
        if entry is None or len(entry[0]) != len(owners) or any(a is not b for a, b in zip(entry[0], owners)):
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, value: Any, *owners: Any) -> Any:
        """Store ``value`` (returned) under ``key`` for ``owners``, dropping the least recently used entry when
        full."""
        self._data[key] = (owners, value)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], Any], *owners: Any) -> Any:
        hit = self.get(key, *owners)
        return hit if hit is not None else self.put(key, make(), *owners)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        entry = self._data.pop(key, None)
        return default if entry is None else entry[1]

    def owned_by(self, owner: Any) -> list:
        """The values of the entries one of whose owners is ``owner``."""
        return [value for owners, value in self._data.values() if any(o is owner for o in owners)]

    def clear(self) -> None:
        self._data.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def info(self) -> CacheInfo:
        return CacheInfo(self.name, self.hits, self.misses, len(self._data), self.maxsize)


def cache_info() -> dict[str, CacheInfo]:
    """Hits, misses and sizes of every cache of compiled functions, by name.

    A miss compiles (seconds); a steady training loop should show hits only after its first iterations.

    Example:
        ```python
        import neuralode

        info = neuralode.compiled.cache_info()
        assert all(c.size <= c.maxsize for c in info.values())
        ```
    """
    return {c.name: c.info() for c in _ALL}


def clear_caches() -> None:
    """Drop every compiled function neuralode holds (the next solve compiles again) and reset the counts."""
    for c in _ALL:
        c.clear()


def backend_of(compile: Any) -> str | None:
    """The ``torch.compile`` backend a ``compile`` option asks for: None for False/None, ``"inductor"`` for
    True, else the backend's name."""
    if not compile:
        return None
    return compile if isinstance(compile, str) else "inductor"


_WARNED: set = set()


def warn_fallback(message: str, stacklevel: int = 3) -> None:
    """Warn once per process and message that a compiled path falls back to the eager solver (or to eager
    kernels), and why."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
