"""Picks the array namespace the data plane computes with: CuPy on a visible CUDA device, NumPy otherwise.

The cache and the lookup path are written once against ``xp``; this module is the only place that
knows CuPy exists, so a CPU-only host never imports it and a GPU host needs no code change.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from node_agent.errors import InvalidArgumentError, UnavailableError

log = logging.getLogger(__name__)

_CUDA_NAME = re.compile(r"^(?:cuda|gpu)(?::(\d+))?$")


def _import_cupy() -> ModuleType | None:
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]
    except Exception:  # ImportError, or a CUDA runtime that fails to load: both mean "no GPU here"
        return None
    return cupy  # type: ignore[no-any-return,unused-ignore]


def cuda_device_count() -> int:
    """CUDA devices CuPy can see (0 when CuPy or the driver is missing)."""
    cupy = _import_cupy()
    if cupy is None:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver / no device: CuPy raises its own CUDARuntimeError
        return 0


def get_xp(device: str = "auto") -> tuple[ModuleType, str]:
    """``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) → ``(xp, device_name)``.

    ``auto`` means CuPy on ``cuda:0`` when CuPy imports and a CUDA device is visible, else NumPy on
    ``cpu``. Asking for ``cuda`` where there is none raises :class:`UnavailableError` rather than
    silently running on the CPU.
    """
    name = device.strip().lower()
    if name == "cpu":
        log.info("array backend: NumPy on cpu (requested)")
        return np, "cpu"
    if name == "auto":
        if cuda_device_count() > 0:
            cupy = _import_cupy()
            assert cupy is not None
            log.info("array backend: CuPy on cuda:0 (auto)")
            return cupy, "cuda:0"
        log.info("array backend: NumPy on cpu (auto: no CuPy or no CUDA device)")
        return np, "cpu"
    match = _CUDA_NAME.match(name)
    if not match:
        raise InvalidArgumentError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    index = int(match.group(1) or 0)
    count = cuda_device_count()
    if count == 0:
        raise UnavailableError(f"device {device!r} requested but no CUDA device is visible (CuPy missing?)")
    if index >= count:
        raise UnavailableError(f"device {device!r} requested but only {count} CUDA device(s) are visible")
    cupy = _import_cupy()
    assert cupy is not None
    log.info("array backend: CuPy on cuda:%d", index)
    return cupy, f"cuda:{index}"


def device_index(device_name: str) -> int | None:
    """``cuda:N`` → ``N``; ``cpu`` → ``None``."""
    match = _CUDA_NAME.match(device_name)
    return int(match.group(1) or 0) if match else None


@contextlib.contextmanager
def on_device(xp: ModuleType, device_name: str) -> Iterator[None]:
    """Makes ``device_name`` current for the arrays allocated inside (a no-op on NumPy)."""
    index = device_index(device_name)
    if xp is np or index is None:
        yield
        return
    with xp.cuda.Device(index):
        yield


def to_host(array: Any) -> np.ndarray:
    """A NumPy array with the same contents (copies device arrays to the host; no copy for NumPy)."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    if callable(get):  # cupy.ndarray.get() is the device → host copy
        return np.asarray(get())
    return np.asarray(array)
