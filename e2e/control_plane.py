"""A real Kubernetes control plane on this machine, for the e2e suite and ``scripts/cluster.sh``.

etcd, kube-apiserver (RBAC, service-account tokens, the aggregation layer, loopback only, free ports),
kube-controller-manager (garbage collector, StatefulSet, Job, HPA, namespace and token controllers),
kube-scheduler, and kwok, built from the Go module proxy by ``scripts/build-control-plane.sh``. kwok
plays the kubelets: it keeps the fake GPU nodes' heartbeats and moves the pods scheduled there to
Running and Ready (and Job pods to Succeeded); no container runs. That is the one stand-in, and what
it cannot show (a process serving in the pod) is tested on the embedded default instead.

Nodes: ``nodes`` GPU nodes of ``gpus_per_node`` ``nvidia.com/gpu`` with the GPU-memory label NVIDIA's
feature discovery sets. Storage: no provisioner runs here, so ``up`` creates a default StorageClass
(``WaitForFirstConsumer``, no provisioner) and local PersistentVolumes on every node; the scheduler
binds claims to them as it would on a cluster with pre-provisioned local disks.

Everything lives under ``state_dir`` (certificates, etcd's data, logs, ``kubeconfig``); ``down`` stops
the processes and removes it. Usage: ``python -m e2e.control_plane up|down|status [--state-dir D]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = ROOT / ".state" / "cluster"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ControlPlaneError(RuntimeError):
    """A component did not build, start or become healthy; the message names it and its log."""


@dataclass(frozen=True)
class NodePool:
    """``count`` nodes named ``<prefix>-<i>``, each with ``gpus`` GPUs of ``gpu_memory_mib`` MiB."""

    prefix: str = "gpu-node"
    count: int = 4
    gpus: int = 8
    gpu_memory_mib: int = 81920
    cpu: str = "64"
    memory: str = "512Gi"
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[tuple[str, str, str], ...] = ()  # (key, value, effect)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_manifest(pool: NodePool, index: int) -> dict[str, Any]:
    """A node kwok manages: allocatable GPUs, the GPU-memory label, Linux/amd64 like a real GPU node."""
    name = f"{pool.prefix}-{index}"
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "gpu",
        "type": "kwok",
        # what NVIDIA's GPU feature discovery labels a GPU node with
        **({GPU_MEMORY_LABEL: str(pool.gpu_memory_mib), "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.count": str(pool.gpus), "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
           if pool.gpus else {}),
        **dict(pool.labels),
    }
    resources = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110", "ephemeral-storage": "1Ti"}
    if pool.gpus:
        resources["nvidia.com/gpu"] = str(pool.gpus)
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {KWOK_NODE_ANNOTATION: "fake"}},
        "spec": {},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }
    if pool.taints:
        node["spec"]["taints"] = [{"key": k, "value": v, "effect": e} for k, v, e in pool.taints]
    return node


def local_volume_manifests(node: str, count: int, size: str = "2Ti") -> list[dict[str, Any]]:
    """Pre-provisioned local PersistentVolumes on ``node`` for the default StorageClass."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"local-{node}-{i}", "labels": {"hps.dev/test-volume": "true"}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "local",
                "local": {"path": f"/mnt/disks/vol{i}"},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}
                        ]
                    }
                },
            },
        }
        for i in range(count)
    ]


#: what the API server records: every request of a service account (the operator, the controllers)
#: at Metadata level, so a test can check the operator's watches and permissions; nothing else
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        {"level": "None", "users": ["system:kube-scheduler", "system:kube-controller-manager"]},
        {"level": "None", "userGroups": ["system:nodes", "system:serviceaccounts:kube-system"]},
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}

STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": "local", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "kubernetes.io/no-provisioner",
    "volumeBindingMode": "WaitForFirstConsumer",
    "reclaimPolicy": "Retain",
}


class ControlPlane:
    """The processes of one control plane, their certificates and their state, under ``state_dir``."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR, *, bin_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self._bin_dir = bin_dir

    # -- paths --------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def audit_log(self) -> Path:
        """JSON lines, one per request of a service account (see :data:`AUDIT_POLICY`)."""
        return self.logs / "audit.log"

    def _pid_file(self, component: str) -> Path:
        return self.state_dir / "run" / f"{component}.pid"

    def _info_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def bin_dir(self) -> Path:
        """The cached binaries, built on first use (minutes on a cold cache, instant after)."""
        if self._bin_dir is None:
            try:
                out = subprocess.run(["bash", str(ROOT / "scripts" / "build-control-plane.sh")], check=True,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
            except subprocess.CalledProcessError as exc:
                raise ControlPlaneError(f"building the control plane failed (exit {exc.returncode})") from exc
            self._bin_dir = Path(out.stdout.strip().splitlines()[-1])
        return self._bin_dir

    # -- lifecycle ----------------------------------------------------------------------------

    def running(self) -> dict[str, int | None]:
        """Each component's pid when its process is alive, else None."""
        return {c: self._alive_pid(c) for c in COMPONENTS}

    def _alive_pid(self, component: str) -> int | None:
        try:
            pid = int(self._pid_file(component).read_text())
        except (OSError, ValueError):
            return None
        try:
            # reap it if it is our child and has exited (a zombie still answers signal 0)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return None
        except ChildProcessError:
            pass  # started by another process (scripts/cluster.sh up): signal 0 tells
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def up(self, pools: Sequence[NodePool] = (NodePool(),), *, volumes_per_node: int = 8,
           timeout_s: float = 120.0) -> Path:  # fmt: skip
        """Starts whatever is not running (idempotent), waits until the API serves and the nodes are
        Ready, and returns the kubeconfig's path."""
        alive = self.running()
        if all(alive.values()) and self._healthy():
            return self.kubeconfig
        if any(alive.values()):
            self.down(keep_state=False)
        bins = self.bin_dir()
        for d in (self.pki, self.logs, self.state_dir / "run", self.state_dir / "etcd"):
            d.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "kwok")}
        self._info_file().write_text(json.dumps({"ports": ports}))
        self._make_pki()
        self._write_kubeconfigs(ports["apiserver"])
        try:
            self._start_etcd(bins, ports)
            self._start_apiserver(bins, ports)
            self._wait_api(timeout_s)
            self._start("kube-controller-manager", [str(bins / "kube-controller-manager"), *self._controller_manager_args()])
            self._start("kube-scheduler", [str(bins / "kube-scheduler"), *self._scheduler_args()])
            self._start("kwok", [str(bins / "kwok"), f"--config={bins / 'kwok-stages.yaml'}", *self._kwok_args(ports["kwok"])])
            self._register(pools, volumes_per_node)
            self._wait_nodes_ready([f"{p.prefix}-{i}" for p in pools for i in range(p.count)], timeout_s)
        except BaseException:
            self.down(keep_state=True)
            raise
        return self.kubeconfig

    def down(self, *, keep_state: bool = False, grace_s: float = 3.0) -> None:
        """Stops every component (SIGTERM, then SIGKILL after ``grace_s``) and removes the state
        directory unless ``keep_state`` (logs to read after a failed start). A test cluster's data is
        thrown away, so there is nothing a longer graceful shutdown would save."""
        for component in reversed(COMPONENTS):
            pid = self._alive_pid(component)
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for component in reversed(COMPONENTS):
            while self._alive_pid(component) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            pid = self._alive_pid(component)
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            self._pid_file(component).unlink(missing_ok=True)
        if not keep_state and self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        alive = self.running()
        return {
            "kubeconfig": str(self.kubeconfig),
            "components": {c: ({"pid": pid} if pid else "stopped") for c, pid in alive.items()},
            "healthy": all(alive.values()) and self._healthy(),
        }

    # -- certificates -------------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=self.pki)
        if result.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")

    def _ca(self, name: str, subject: str) -> None:
        if (self.pki / f"{name}.crt").exists():
            return
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                      f"{name}.crt", "-days", "3650", "-subj", subject)  # fmt: skip

    def _cert(self, name: str, ca: str, subject: str, *, server_sans: str | None = None) -> None:
        if (self.pki / f"{name}.crt").exists():
            return
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                      "-subj", subject)  # fmt: skip
        ext = self.pki / f"{name}.ext"
        usage = "serverAuth" if server_sans else "clientAuth"
        ext.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n" + (f"subjectAltName={server_sans}\n" if server_sans else "")
        )
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                      "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", ext.name)  # fmt: skip

    def issue_server_cert(self, name: str, sans: str) -> tuple[Path, Path]:
        """A serving certificate signed by the cluster's CA (for a test's own HTTPS server)."""
        self._cert(name, "ca", f"/CN={name}", server_sans=sans)
        return self.pki / f"{name}.crt", self.pki / f"{name}.key"

    def _make_pki(self) -> None:
        self._ca("ca", "/CN=hps-test-ca")
        self._ca("front-proxy-ca", "/CN=hps-test-front-proxy-ca")
        sans = ("DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                "DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1")  # fmt: skip
        self._cert("apiserver", "ca", "/CN=kube-apiserver", server_sans=sans)
        self._cert("admin", "ca", "/O=system:masters/CN=kubernetes-admin")
        self._cert("controller-manager", "ca", "/CN=system:kube-controller-manager")
        self._cert("scheduler", "ca", "/CN=system:kube-scheduler")
        self._cert("front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client")
        if not (self.pki / "sa.key").exists():
            self._openssl("genrsa", "-out", "sa.key", "2048")
            self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _kubeconfig_text(self, server: str, user: str) -> str:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "hps-test", "cluster": {"server": server,
                                                          "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate": str(self.pki / f"{user}.crt"),
                                              "client-key": str(self.pki / f"{user}.key")}}],
            "contexts": [{"name": "hps-test", "context": {"cluster": "hps-test", "user": user}}],
            "current-context": "hps-test",
        }  # fmt: skip
        return json.dumps(config, indent=2)

    def _write_kubeconfigs(self, port: int) -> None:
        server = f"https://127.0.0.1:{port}"
        self.kubeconfig.write_text(self._kubeconfig_text(server, "admin"))
        for user in ("controller-manager", "scheduler"):
            (self.state_dir / f"{user}.kubeconfig").write_text(self._kubeconfig_text(server, user))

    # -- processes ----------------------------------------------------------------------------

    def _start(self, component: str, argv: list[str]) -> None:
        log = (self.logs / f"{component}.log").open("ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=self.state_dir)  # fmt: skip
        log.close()
        self._pid_file(component).write_text(str(process.pid))
        time.sleep(0.2)
        if process.poll() is not None:
            raise ControlPlaneError(f"{component} exited at start; see {self.logs / (component + '.log')}")

    def _start_etcd(self, bins: Path, ports: dict[str, int]) -> None:
        client, peer = f"http://127.0.0.1:{ports['etcd']}", f"http://127.0.0.1:{ports['etcd-peer']}"
        self._start("etcd", [
            str(bins / "etcd"), "--name=hps-test", f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=hps-test={peer}", "--listen-metrics-urls=",
            # a test cluster's data is thrown away: fsync only costs time
            "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn",
        ])  # fmt: skip

    def _start_apiserver(self, bins: Path, ports: dict[str, int]) -> None:
        pki = self.pki
        policy = self.state_dir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        self._start("kube-apiserver", [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            # as on hardened clusters: an owner reference with blockOwnerDeletion needs the right to
            # update the owner's finalizers
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-maxsize=200",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # the aggregation layer (custom and external metrics APIs)
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            # the only address here is loopback, which the kubernetes Service's Endpoints refuse
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true", "--profiling=false", "--v=1",
        ])  # fmt: skip

    def _controller_manager_args(self) -> list[str]:
        kubeconfig = str(self.state_dir / "controller-manager.kubeconfig")
        return [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}", "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={self.pki / 'ca.crt'}", f"--cluster-signing-key-file={self.pki / 'ca.key'}",
            "--leader-elect=false",
            # test pace: the HPA every 5 s, a node without heartbeat noticed within 20 s
            "--horizontal-pod-autoscaler-sync-period=5s",
            "--horizontal-pod-autoscaler-downscale-stabilization=15s",
            "--node-monitor-grace-period=20s",
            "--v=1",
        ]  # fmt: skip

    def _scheduler_args(self) -> list[str]:
        kubeconfig = str(self.state_dir / "scheduler.kubeconfig")
        return [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false", "--v=1",
        ]  # fmt: skip

    def _kwok_args(self, port: int) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            "--cidr=10.0.0.1/16", "--node-ip=10.0.0.1", "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{port}",
        ]  # fmt: skip

    # -- API ----------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _server(self) -> str:
        ports = json.loads(self._info_file().read_text())["ports"]
        return f"https://127.0.0.1:{ports['apiserver']}"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One admin request; returns the decoded JSON (or None on 404)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self._server() + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=10) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code == 409 and method == "POST":
                return None  # already there: up is idempotent
            raise ControlPlaneError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc
        return json.loads(text) if text else None

    def _healthy(self) -> bool:
        try:
            return self._get_text("/readyz") == "ok"
        except (OSError, ValueError, KeyError, ssl.SSLError):
            return False

    def _get_text(self, path: str) -> str:
        req = urllib.request.Request(self._server() + path)
        with urllib.request.urlopen(req, context=self._ssl_context(), timeout=5) as response:
            return str(response.read().decode().strip())

    def _wait_api(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._healthy():
                return
            for component in ("etcd", "kube-apiserver"):
                if self._alive_pid(component) is None:
                    raise ControlPlaneError(f"{component} stopped; see {self.logs / (component + '.log')}")
            time.sleep(0.5)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout_s:.0f}s; see {self.logs}")

    def _register(self, pools: Sequence[NodePool], volumes_per_node: int) -> None:
        self.request("POST", "/apis/storage.k8s.io/v1/storageclasses", STORAGE_CLASS)
        for pool in pools:
            for i in range(pool.count):
                self.add_node(pool, i, volumes=volumes_per_node)

    def add_node(self, pool: NodePool, index: int, *, volumes: int = 8) -> None:
        """Registers one node (kwok brings it Ready) and its local volumes; a node pool scaling up."""
        node = node_manifest(pool, index)
        self.request("POST", "/api/v1/nodes", node)
        for volume in local_volume_manifests(node["metadata"]["name"], volumes):
            self.request("POST", "/api/v1/persistentvolumes", volume)

    def _wait_nodes_ready(self, names: Sequence[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            nodes = (self.request("GET", "/api/v1/nodes") or {}).get("items", [])
            ready = {
                n["metadata"]["name"]
                for n in nodes
                if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
            }
            if set(names) <= ready:
                return
            if self._alive_pid("kwok") is None:
                raise ControlPlaneError(f"kwok stopped; see {self.logs / 'kwok.log'}")
            time.sleep(0.5)
        raise ControlPlaneError(f"nodes not Ready after {timeout_s:.0f}s (kwok: {self.logs / 'kwok.log'})")


@contextlib.contextmanager
def running(state_dir: Path, pools: Sequence[NodePool] = (NodePool(),)) -> Iterator[ControlPlane]:
    plane = ControlPlane(state_dir)
    plane.up(pools)
    try:
        yield plane
    finally:
        plane.down()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--nodes", type=int, default=4, help="GPU nodes to register (default 4)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="nvidia.com/gpu per node (default 8)")
    parser.add_argument("--gpu-memory-mib", type=int, default=81920,
                        help="the nvidia.com/gpu.memory label, MiB (default 81920)")  # fmt: skip
    args = parser.parse_args(argv)
    plane = ControlPlane(args.state_dir)
    try:
        if args.command == "up":
            pool = NodePool(count=args.nodes, gpus=args.gpus_per_node, gpu_memory_mib=args.gpu_memory_mib)
            kubeconfig = plane.up((pool,))
            print(f"KUBECONFIG={kubeconfig}")
        elif args.command == "down":
            plane.down()
            print("stopped")
        else:
            print(json.dumps(plane.status(), indent=2))
    except ControlPlaneError as exc:
        print(f"cluster.sh: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
