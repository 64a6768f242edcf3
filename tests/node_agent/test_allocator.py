"""glibc's allocator thresholds (``node_agent.allocator``): set where glibc is, left alone when told."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from node_agent import allocator

GLIBC = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc") if hasattr(os, "confstr") else False


def run(code: str, **env: str) -> str:
    """``code`` in a fresh interpreter (thresholds are per process), its stdout."""
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True, timeout=60)  # fmt: skip
    return done.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_the_thresholds_are_set_on_glibc_and_left_alone_when_turned_off() -> None:
    code = "from node_agent.allocator import keep_freed_memory as k; print(k())"
    assert run(code, HPS_MALLOC_TUNING="") == "True"
    for off in ("off", "0", "false", "NO"):
        assert run(code, HPS_MALLOC_TUNING=off) == "False"


def test_the_lookup_commands_tune_their_process_and_the_others_do_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hps lookup`` and ``hps bench`` make lookups in their own process; ``hps plan`` makes none."""
    import hps_operator.cli as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("tuned") or True)
    # a lookup whose keys are refused before any connection: the process was tuned all the same
    assert cli.main(["lookup", "--endpoint", "127.0.0.1:1", "--model", "m", "--table", "t", "--keys", "x"]) != 0
    assert calls == ["tuned"]
    assert "--keys" in capsys.readouterr().err
    assert cli.main(["plan", "-f", "/nonexistent/model.yaml"]) != 0
    assert calls == ["tuned"]
def test_the_equivalent_tunables_name_both_thresholds() -> None:
    assert allocator.tunables() == (
        f"glibc.malloc.mmap_threshold={allocator.MMAP_THRESHOLD}:glibc.malloc.trim_threshold={allocator.TRIM_THRESHOLD}"
    )
    assert allocator.MMAP_THRESHOLD >= 4 << 20  # a 4,096-key answer of dim 128 fp32 (2 MiB) comes from the heap
