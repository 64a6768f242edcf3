"""glibc's allocator, told to keep the memory a batch frees for the next batch.

A lookup answer is hundreds of KiB to a few MiB (4,096 keys x 64 fp32 is 1 MiB), and gRPC, protobuf and
NumPy each allocate buffers that size once or twice per call. glibc serves such requests with a fresh
``mmap`` above its mmap threshold (128 KiB at start, raised only by frees it happens to see) and hands
the heap's freed top back to the kernel above its trim threshold: every call then page-faults its
buffers in again and the kernel zeroes them. Profiled (``perf``) on the benchmark's agent, page faults
and page clearing were the largest kernel cost of a lookup. ``bench/malloc.py`` (tuning off and on in
alternating runs, medians of 3): an agent answering from its L1 (the whole table cached) served 1.69x
the keys/s over gRPC and 1.04x over its same-node socket; at the benchmark's default (10% cached,
Redis behind) the difference is within the machine's noise, as Redis's time dominates
(``bench/results/lookup-malloc-l1-all.json``, ``lookup-malloc.json``).

:func:`keep_freed_memory` raises both thresholds, so buffers up to :data:`MMAP_THRESHOLD` come from the
heap and a freed heap is kept up to :data:`TRIM_THRESHOLD` per arena. The agent and the ``hps`` command
call it at start; a process using the client library can call it too (or start with the equivalent
``GLIBC_TUNABLES``, printed by :func:`tunables`). ``HPS_MALLOC_TUNING=off`` leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

#: mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: allocations up to this many bytes come from the heap, not a fresh mmap (an answer of 8 MiB and less)
MMAP_THRESHOLD = 8 << 20
#: freed memory at the top of a heap is returned to the kernel only beyond this many bytes
TRIM_THRESHOLD = 64 << 20
#: the environment variable that turns the tuning off (``off``, ``0``, ``false``, ``no``)
ENV = "HPS_MALLOC_TUNING"


def tunables() -> str:
    """The ``GLIBC_TUNABLES`` value that does what :func:`keep_freed_memory` does, from process start."""
    return f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


def keep_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds for this process; True when they were set. Does nothing
    (False) off glibc, or when ``HPS_MALLOC_TUNING`` says ``off``."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    if not on_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.debug("glibc refused the malloc thresholds; allocating as it does by default")
    return done


def on_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a glibc system: no such name
        return False
