"""Picks the array namespace the data plane computes with: CuPy on a visible CUDA device, NumPy otherwise.

The cache and the lookup path are written once against ``xp``; this module is the only place that
knows CuPy exists, so a CPU-only host never imports it and a GPU host needs no code change.
"""

from __future__ import annotations

import contextlib
import functools
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


#: what a CUDA host without the toolkit's headers needs (CuPy compiles kernels with NVRTC at first use)
_HEADERS_HINT = (
    "CuPy compiles its kernels at run time and needs the CUDA headers for that: install the project "
    "with its gpu extra (pip install 'hps-operator[gpu]', which pulls CuPy's ctk extra), or run on a "
    "CUDA devel image"
)


@functools.cache
def kernel_probe(index: int) -> str | None:
    """Compiles and runs one tiny elementwise kernel on ``cuda:index``; ``None`` when that works, else
    why not. Importing CuPy and counting devices succeed on a host whose CuPy cannot compile a kernel
    (no CUDA headers: NVRTC fails on CUDA >= 12.2), and the first lookup would fail there instead; so
    the backend is not chosen until a kernel has run. Once per device and process."""
    cupy = _import_cupy()
    if cupy is None:
        return "CuPy does not import"
    try:
        with cupy.cuda.Device(index):
            square_plus_one = cupy.ElementwiseKernel("int64 x", "int64 y", "y = x * x + 1", "hps_kernel_probe")
            got = square_plus_one(cupy.arange(4, dtype=cupy.int64)).get().tolist()
    except Exception as exc:  # CompileException, CUDADriverError, a missing NVRTC library: all say "not here"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if got != [1, 2, 5, 10]:
        return f"the probe kernel computed {got}, not [1, 2, 5, 10]"
    return None


def get_xp(device: str = "auto") -> tuple[ModuleType, str]:
    """``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) → ``(xp, device_name)``.

    ``auto`` means CuPy on ``cuda:0`` when CuPy imports, a CUDA device is visible and a kernel compiles
    and runs there, else NumPy on ``cpu`` (logged as an error when only the kernel failed: that host
    has a GPU it cannot use). Asking for ``cuda`` where there is none, or where kernels do not compile,
    raises :class:`UnavailableError` naming the fix rather than silently running on the CPU.
    """
    name = device.strip().lower()
    if name == "cpu":
        log.info("array backend: NumPy on cpu (requested)")
        return np, "cpu"
    if name == "auto":
        if cuda_device_count() > 0:
            broken = kernel_probe(0)
            if broken is None:
                cupy = _import_cupy()
                assert cupy is not None
                log.info("array backend: CuPy on cuda:0 (auto)")
                return cupy, "cuda:0"
            log.error("array backend: NumPy on cpu although cuda:0 is visible: a CUDA kernel failed to "
                      "compile or run (%s). %s", broken, _HEADERS_HINT)  # fmt: skip
            return np, "cpu"
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
    broken = kernel_probe(index)
    if broken is not None:
        raise UnavailableError(f"device {device!r}: a CUDA kernel failed to compile or run ({broken}). {_HEADERS_HINT}")
    cupy = _import_cupy()
    assert cupy is not None
    log.info("array backend: CuPy on cuda:%d", index)
    return cupy, f"cuda:{index}"


def device_index(device_name: str) -> int | None:
    """``cuda:N`` → ``N``; ``cpu`` → ``None``."""
    match = _CUDA_NAME.match(device_name)
    return int(match.group(1) or 0) if match else None


def new_stream(xp: ModuleType, device_name: str) -> Any:
    """A CUDA stream of its own on ``device_name`` for one cache's work (``None`` on NumPy)."""
    index = device_index(device_name)
    if xp is np or index is None:
        return None
    with xp.cuda.Device(index):
        return xp.cuda.Stream(non_blocking=True)


@contextlib.contextmanager
def on_device(xp: ModuleType, device_name: str, *, stream: Any = None) -> Iterator[None]:
    """Makes ``device_name`` current for the arrays allocated inside (a no-op on NumPy).

    With ``stream``, the work inside runs on it, ordered after what the calling thread had queued on
    its own current stream (the inputs it hands in), and the caller's stream waits for that work
    before anything the caller queues next (the outputs it reads): events, not host syncs. Without
    this, threads on per-thread default streams would race one another on shared arrays.
    """
    index = device_index(device_name)
    if xp is np or index is None:
        yield
        return
    with xp.cuda.Device(index):
        if stream is None:
            yield
            return
        caller = xp.cuda.get_current_stream()
        if caller.ptr == stream.ptr:  # already on it (a nested call)
            yield
            return
        stream.wait_event(caller.record())
        try:
            with stream:
                yield
        finally:
            caller.wait_event(stream.record())


def to_host(array: Any) -> np.ndarray:
    """A NumPy array with the same contents (copies device arrays to the host; no copy for NumPy)."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    if callable(get):  # cupy.ndarray.get() is the device → host copy
        return np.asarray(get())
    return np.asarray(array)
