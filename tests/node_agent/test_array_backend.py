"""Choosing the array backend (``node_agent.array_backend``): a CUDA device is used only once a kernel
has compiled and run on it, and a GPU whose kernels cannot compile (no CUDA headers) is named as such.

No GPU runs here, so CuPy is replaced by a stand-in module built on NumPy: it sees one device and
compiles its elementwise kernels, or fails the way CuPy's NVRTC does without the headers. The same
checks run against the real CuPy in ``tests/gpu``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

import node_agent.array_backend as backend
from node_agent.errors import InvalidArgumentError, UnavailableError


class CompileException(Exception):
    """What CuPy raises when NVRTC cannot compile a kernel."""


def stand_in_cupy(*, compiles: bool) -> ModuleType:
    """A CuPy with one device whose ``ElementwiseKernel`` runs the operation on NumPy, or raises the
    error NVRTC gives without the CUDA headers."""

    class ElementwiseKernel:
        def __init__(self, in_params: str, out_params: str, operation: str, name: str) -> None:
            if not compiles:
                raise CompileException('catastrophic error: cannot open source file "cuda_fp16.h"')
            assert operation == "y = x * x + 1" and name == "hps_kernel_probe"

        def __call__(self, x: np.ndarray) -> Any:
            return SimpleNamespace(get=lambda: x * x + 1)

    module = ModuleType("cupy")
    module.cuda = SimpleNamespace(  # type: ignore[attr-defined]
        runtime=SimpleNamespace(getDeviceCount=lambda: 1),
        Device=lambda index: contextlib.nullcontext(),
    )
    module.int64 = np.int64  # type: ignore[attr-defined]
    module.arange = np.arange  # type: ignore[attr-defined]
    module.ElementwiseKernel = ElementwiseKernel  # type: ignore[attr-defined]
    return module


@pytest.fixture
def with_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def install(*, compiles: bool) -> ModuleType:
        module = stand_in_cupy(compiles=compiles)
        monkeypatch.setattr(backend, "_import_cupy", lambda: module)
        backend.kernel_probe.cache_clear()
        return module

    yield install
    backend.kernel_probe.cache_clear()


def test_a_gpu_whose_kernels_compile_is_chosen(with_cupy: Any) -> None:
    cupy = with_cupy(compiles=True)
    assert backend.get_xp("auto") == (cupy, "cuda:0")
    assert backend.get_xp("cuda") == (cupy, "cuda:0")
    assert backend.kernel_probe(0) is None


def test_a_gpu_without_cuda_headers_is_refused_when_asked_for_and_skipped_on_auto(
    with_cupy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with_cupy(compiles=False)
    with pytest.raises(UnavailableError, match=r"cuda_fp16\.h.*pip install 'hps-operator\[gpu\]'"):
        backend.get_xp("cuda:0")
    with caplog.at_level(logging.ERROR, logger="node_agent.array_backend"):
        assert backend.get_xp("auto") == (np, "cpu")
    assert "cuda:0 is visible" in caplog.text and "CUDA headers" in caplog.text


def test_no_gpu_means_numpy_and_a_clear_error_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)
    assert backend.get_xp("auto") == (np, "cpu")
    with pytest.raises(UnavailableError, match="no CUDA device is visible"):
        backend.get_xp("cuda")
    with pytest.raises(InvalidArgumentError, match="use auto, cpu, cuda or cuda:N"):
        backend.get_xp("tpu")


def test_on_device_and_streams_are_no_ops_on_numpy() -> None:
    assert backend.new_stream(np, "cpu") is None
    with backend.on_device(np, "cpu", stream=None):
        assert backend.to_host(np.arange(3)).tolist() == [0, 1, 2]
