"""The partition autoscaler on the embedded default: a one-partition stack whose L1 is too small for
its Zipf traffic (hit rate below ``spec.autoscaling.partitions.targetHitRate``) is widened by
``hps local autoscale`` to two partitions through a make-before-break rollout, while a thread keeps
looking up through ``RoutedClient.from_local_state`` and checks every vector against the source
array. The hit rate must rise, bytes must move, and no lookup may fail or be wrong. The autoscaler's
windows are shortened (``--widen-after``, ``--cooldown``) so the scenario takes seconds, not minutes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node_agent.errors import HpsError
from node_agent.routing import RoutedClient

pytestmark = pytest.mark.slow

ROWS, DIM = 40_000, 16
CLI_TIMEOUT_S = 120


def hps(*args: str | Path, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hps_operator", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"hps {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_a_stack_whose_cache_is_too_small_widens_without_failing_a_lookup(
    tmp_path: Path, scenario_report: dict[str, list[dict[str, Any]]]
) -> None:
    rng = np.random.default_rng(5)
    items = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    np.save(tmp_path / "items.npy", items)
    model = tmp_path / "model.yaml"
    model.write_text(f"""\
apiVersion: hps.dev/v1alpha1
kind: EmbeddingModel
metadata: {{name: shelf}}
spec:
  tables:
  - {{name: items, rows: {ROWS}, dim: {DIM}, source: items.npy}}
  partitions: 1
  cache: {{memoryPerGPU: 256Ki, cachedFraction: 0.1}}
  placement: {{strategy: row}}
  autoscaling: {{minReplicas: 1, maxReplicas: 1, partitions: {{min: 1, max: 2, targetHitRate: 0.9}}}}
""")
    state = tmp_path / "state"
    hps("local", "up", "-f", model, "--state-dir", state)
    stop, counts = threading.Event(), {"lookups": 0, "failed": 0, "wrong": 0}
    keys_rng = np.random.default_rng(11)

    def load() -> None:
        deadline = time.monotonic() + 90
        with RoutedClient.from_local_state(state) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                keys = (keys_rng.zipf(1.1, size=256) - 1) % ROWS
                try:
                    got = client.lookup("shelf", "items", keys)
                except HpsError:
                    counts["failed"] += 1
                    continue
                finally:
                    counts["lookups"] += 1
                if not np.array_equal(got, items[keys]):
                    counts["wrong"] += 1

    thread = threading.Thread(target=load, name="zipf-traffic")
    thread.start()
    try:
        done = hps("local", "autoscale", "--state-dir", state, "--interval", "1", "--widen-after", "4",
                   "--cooldown", "6", "--min-lookups", "2000", "--grace", "1", "--duration", "22", "-o", "json")  # fmt: skip
    finally:
        stop.set()
        thread.join(60)
        hps("local", "down", "--state-dir", state)
    samples = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    widened = [s for s in samples if s.get("to") == 2]
    assert len(widened) == 1, samples
    before = [s["hitRate"] for s in samples if s["partitions"] == 1 and s["hitRate"] is not None]
    after = [s["hitRate"] for s in samples if s["partitions"] == 2 and s["hitRate"] is not None]
    assert before and after, samples
    assert np.median(after) > np.median(before) + 0.03, (before, after)
    assert widened[0]["movedBytes"] > 0 and widened[0]["reason"]
    assert counts["lookups"] > 100 and counts["failed"] == 0 and counts["wrong"] == 0, counts
    scenario_report.setdefault("partition autoscaling (hps local autoscale, Zipf traffic)", []).append({
        "partitions": "1 -> 2", "hit rate before": f"{np.median(before):.3f}", "hit rate after": f"{np.median(after):.3f}",
        "moved bytes": widened[0]["movedBytes"], "lookups": counts["lookups"], "failed": counts["failed"],
        "wrong": counts["wrong"],
    })  # fmt: skip
