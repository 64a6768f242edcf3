"""Fixtures for scenarios on the real control plane (``e2e/control_plane.py``): the cluster, the chart
installed by ``helm install``, and the operator as a real ``hps operator run`` process that logs in
with the chart's ServiceAccount token, so the chart's RBAC is what the API server enforces.

One cluster and one operator serve the whole session (starting them takes seconds once the binaries
are cached); each scenario works in a namespace of its own.

What the scenario tests report beyond pass/fail: a table a scenario records (the fault scenarios'
lookups, failures, wrong vectors and updates) is printed in pytest's terminal summary, whatever
``-s`` says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.control_plane import ControlPlane, NodePool

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools" / "bin"
RELEASE = "hps-operator"
OPERATOR_NAMESPACE = "hps-system"
#: the operator's pace in these scenarios: a drift check every RESYNC_S, the old plan served SWITCH_S
RESYNC_S = 3.0
SWITCH_S = 4.0
#: as the chart runs it: leader election on the Lease <release>-leader in the release namespace
LEASE_NAME = f"{RELEASE}-leader"
LEASE_S = 6.0
NODE_POOL = NodePool(prefix="gpu-node", count=4, gpus=8, gpu_memory_mib=81920)


def tool(name: str) -> str:
    found = TOOLS / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is None:
        pytest.fail(f"{name} is not installed: scripts/setup.sh unpacks it into .tools/bin")
    return which


@dataclass
class Kube:
    """kubectl and helm against one cluster, as its admin."""

    kubeconfig: Path
    plane: ControlPlane

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
        done = subprocess.run([tool("kubectl"), *args], input=input, capture_output=True, text=True,
                              env=self.env(), timeout=timeout, check=False)  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([tool("helm"), *args], capture_output=True, text=True, env=self.env(),
                              timeout=180, check=False)  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def get(self, kind: str, name: str | None = None, *, namespace: str | None = None,
            selector: str | None = None) -> Any:  # fmt: skip
        """The object (None when absent), or the list's items when ``name`` is None."""
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        args += ["-n", namespace] if namespace else []
        args += ["-l", selector] if selector else []
        done = self.kubectl(*args, check=False)
        if done.returncode != 0:
            if "NotFound" in done.stderr or "not found" in done.stderr:
                return None
            raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        data = json.loads(done.stdout)
        return data if name else data.get("items", [])

    def apply(self, manifest: dict[str, Any] | str, *, namespace: str | None = None,
              server_side: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        args = ["apply", "-f", "-", *(["-n", namespace] if namespace else [])]
        args += ["--server-side"] if server_side else []
        return self.kubectl(*args, input=text, check=check)


@dataclass
class OperatorProcess:
    """``hps operator run`` as the chart's ServiceAccount; start, stop, kill -9, restart."""

    kube: Kube
    log_path: Path
    #: the replica's name (the chart's POD_NAME): the leader's identity and its requests' User-Agent
    identity: str = "operator-0"
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    kubeconfig: Path | None = None
    starts: list[float] = field(default_factory=list)

    def _token_kubeconfig(self) -> Path:
        token = self.kube.kubectl("-n", OPERATOR_NAMESPACE, "create", "token", RELEASE, "--duration=4h").stdout.strip()
        server = json.loads(self.kube.kubeconfig.read_text())["clusters"][0]["cluster"]
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": server}],
            "users": [{"name": RELEASE, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": RELEASE}}],
            "current-context": "e2e",
        }  # fmt: skip
        path = self.log_path.with_suffix(".kubeconfig")
        path.write_text(json.dumps(config))
        return path

    def start(self) -> None:
        self.kubeconfig = self._token_kubeconfig()
        argv = [sys.executable, "-m", "hps_operator", "operator", "run", "--all-namespaces", "--standalone",
                "--resync-seconds", str(RESYNC_S), "--drain-seconds", str(SWITCH_S),
                "--leader-elect", f"--leader-election-id={LEASE_NAME}", f"--lease-seconds={LEASE_S}",
                # the partition autoscaler at test pace: seconds, not the production minutes
                "--partition-widen-after=4", "--partition-cooldown=4", "--partition-min-lookups=1",
                *self.extra_args]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1",
               "POD_NAME": self.identity, "POD_NAMESPACE": OPERATOR_NAMESPACE}  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.starts.append(time.time())

    def stop(self, *, sig: int = signal.SIGTERM, timeout_s: float = 30) -> bool:
        """Sends ``sig`` and waits; SIGKILL after ``timeout_s``. True: it exited by itself."""
        if self.process is None or self.process.poll() is not None:
            return True
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return False
        return True

    def kill(self) -> None:
        """SIGKILL: no clean-up, as a node failure or an OOM kill would leave it."""
        self.stop(sig=signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A real control plane with 4 GPU nodes and the chart installed by ``helm install``."""
    plane = ControlPlane(tmp_path_factory.mktemp("cluster"))
    try:
        kubeconfig = plane.up((NODE_POOL,))
    except Exception:
        plane.down(keep_state=True)
        raise
    cluster = Kube(kubeconfig, plane)
    try:
        cluster.helm("install", RELEASE, str(ROOT / "charts" / "hps-operator"), "-n", OPERATOR_NAMESPACE,
                     "--create-namespace", "--wait=false")  # fmt: skip
        yield cluster
    finally:
        plane.down()


@pytest.fixture(scope="session")
def operator(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    process = OperatorProcess(kube, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
    # a handler that raised is a bug even when a retry or the next resync hid it
    tracebacks = process.log().count("Traceback")
    assert tracebacks == 0, f"the operator logged {tracebacks} traceback(s); its log: {process.log_path}"


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A namespace of the scenario's own, enforcing the Pod Security "restricted" profile: every pod
    the operator's children create must be admitted under it."""
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted",
                 "pod-security.kubernetes.io/enforce-version=latest")  # fmt: skip
    yield name
    refused = [e for e in kube.get("events", namespace=name) if e.get("reason") == "FailedCreate"
               and "violates PodSecurity" in e.get("message", "")]  # fmt: skip
    assert not refused, f"pods refused by Pod Security admission: {refused[0]['message']}"
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def wait_for(what: str, check: Callable[[], Any], *, within_s: float = 60.0, poll_s: float = 0.5) -> Any:
    """Polls ``check`` until it returns something truthy; fails naming ``what`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {within_s:.0f}s waiting for {what} (last: {last!r})")


def condition(model: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((model or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


# ---------------------------------------------------------------------------------------------
# scenario reports

REPORTS = pytest.StashKey[dict[str, list[dict[str, Any]]]]()


@pytest.fixture(scope="session")
def scenario_report(request: pytest.FixtureRequest) -> dict[str, list[dict[str, Any]]]:
    """Tables by title; a test appends rows (dicts, the same keys in each) to ``report[title]``."""
    return request.config.stash.setdefault(REPORTS, {})


def format_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Rows as aligned text columns, headed by their keys."""
    columns = list(rows[0])
    cells = [columns] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for title, rows in config.stash.get(REPORTS, {}).items():
        if not rows:
            continue
        terminalreporter.section(title)
        for line in format_table(rows):
            terminalreporter.write_line(line)
