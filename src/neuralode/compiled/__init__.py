"""``compile=True``: the solver's loop and steps through ``torch.compile``.

What users see of it: :func:`cache_info` (hits, misses and sizes of the caches of compiled functions) and
:func:`clear_caches`. The compiled paths themselves are reached through ``solve(..., compile=True)``.
"""

from .cache import CacheInfo, cache_info, clear_caches

__all__ = ["cache_info", "clear_caches", "CacheInfo"]
