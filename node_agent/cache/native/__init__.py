"""The set-associative cache's query and insert loops compiled in C (``setassoc.c``), built by
``pip install`` of the project where a C compiler is present. ``Kernel`` is ``None`` where the build
was unavailable: the cache then runs its array version, which gives the same answers and state."""

from __future__ import annotations

import importlib
from typing import Any


def _load() -> Any:
    try:
        return importlib.import_module("node_agent.cache.native._setassoc").Kernel
    except ImportError:  # built without a compiler: the array version serves
        return None


Kernel: Any = _load()

__all__ = ["Kernel"]
