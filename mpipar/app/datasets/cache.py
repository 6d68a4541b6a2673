"""Loaded data kept once per process, keyed by exactly what determines it.

An example asks for its data from several hooks (layers, data, after_fit); loading or generating
it each time costs seconds. The key names the loader and the arguments the data depends on
(data dir, window, seed, sizes...), so a different setting in the same process (tests, parity
references) gets its own entry and never a stale one. Callers share the returned object: treat
it as read-only.
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

T = TypeVar("T")
_STORE: dict[Hashable, object] = {}


def cached(key: Hashable, load: Callable[[], T]) -> T:
    """`load()` on the first call for `key` in this process; the same object on every later call.
    Start the key with the loader's name, e.g. ("appliances", data_dir, window)."""
    if key not in _STORE:
        _STORE[key] = load()
    return _STORE[key]


def clear() -> None:
    """Forget everything (frees the memory; the next call for each key loads again)."""
    _STORE.clear()
