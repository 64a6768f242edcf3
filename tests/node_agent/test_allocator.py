"""glibc's allocator thresholds (``node_agent.allocator``): freed answer-sized buffers stay with the
process once tuned, and are handed back to the kernel when told to leave glibc alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from node_agent import allocator

GLIBC = allocator.on_glibc()


def run(code: str, *args: str, **env: str) -> str:
    """``code`` in a fresh interpreter (thresholds are per process), its stdout."""
    done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True, timeout=60)  # fmt: skip
    return done.stdout.strip()


#: allocates 60 buffers of 500 kB (an answer's size, over glibc's default mmap threshold), touches them,
#: frees them, and prints the MiB the process handed back to the kernel; first, optionally, the tuning
PROBE = """
import os, sys
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "tune":
    from node_agent.allocator import keep_freed_memory
    print(keep_freed_memory())
blocks = [bytearray(500_000) for _ in range(60)]
before = resident()
del blocks
print((before - resident()) >> 20)
"""


def returned_mib(tune: bool, **env: str) -> tuple[str, int]:
    """(what keep_freed_memory said, or "" when not called; MiB handed back after the frees)."""
    lines = run(PROBE, "tune" if tune else "plain", **env).splitlines()
    return (lines[0] if tune else ""), int(lines[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_freed_answer_sized_buffers_are_kept_once_tuned_and_handed_back_when_not() -> None:
    _, back = returned_mib(tune=False, HPS_MALLOC_TUNING="", GLIBC_TUNABLES="")
    assert back >= 20  # glibc's default: each 500 kB buffer was its own mapping, unmapped on free
    said, back = returned_mib(tune=True, HPS_MALLOC_TUNING="", GLIBC_TUNABLES="")
    assert said == "True" and back <= 2  # kept on the heap for the next answer
    for off in ("off", "0", "false", "NO"):
        said, back = returned_mib(tune=True, HPS_MALLOC_TUNING=off, GLIBC_TUNABLES="")
        assert said == "False" and back >= 20
    # the GLIBC_TUNABLES the README names for client processes does the same from process start
    _, back = returned_mib(tune=False, HPS_MALLOC_TUNING="", GLIBC_TUNABLES=allocator.tunables())
    assert back <= 2


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
