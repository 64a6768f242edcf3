"""Starts and stops real ``redis-server`` processes on free loopback ports: one standalone server, or a
Redis Cluster of several masters. Used by ``hps local up`` and by the tests' fixtures alike.

A server may serve TLS only (``tls``: its plaintext port closed, the cluster bus over TLS too) and take
its users from an ACL file (``acl_file``: the ``default`` user and one per role, see
:mod:`node_agent.redis_acl`; a restarted server reads them again)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from node_agent.errors import UnavailableError
from node_agent.redis_access import RedisAccess, RedisTLS

if TYPE_CHECKING:
    from node_agent.spec import RedisPersistenceSpec

_START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RedisServerTLS:
    """What a TLS-only redis-server serves: its certificate and key, and the CA clients' (and cluster
    peers') certificates chain to. Clients need no certificate of their own (``tls-auth-clients
    optional``): the ACL users' passwords authenticate them; one presented is checked."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def args(self, port: int, *, cluster: bool) -> list[str]:
        out = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert_file),
               "--tls-key-file", str(self.key_file), "--tls-ca-cert-file", str(self.ca_file),
               "--tls-auth-clients", "optional", "--tls-replication", "yes"]  # fmt: skip
        if cluster:
            out += ["--tls-cluster", "yes"]
        return out

    def client(self) -> RedisTLS:
        """How a client of this machine checks it."""
        return RedisTLS(ca_file=self.ca_file)


#: a cluster node also listens on port + 10000 (its bus), so cluster ports must stay at or below this
CLUSTER_MAX_PORT = 65535 - 10000


def free_port(host: str = "127.0.0.1", *, max_port: int = 65535) -> int:
    """A port nothing listens on right now, at most ``max_port`` (the kernel's pick; racy, so
    callers retry when the server cannot bind)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port <= max_port:
            return port
    raise UnavailableError(f"no free port at or below {max_port} on {host}")


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise UnavailableError(
            "redis-server is not installed; run scripts/setup.sh (it installs the OS package redis-server)"
        )
    return path


@dataclass
class RedisProcess:
    """One ``redis-server`` we started; ``stop()`` ends it (SIGKILL with ``hard=True``)."""

    host: str
    port: int
    workdir: Path
    password: str | None
    pid: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: how clients check it, when it serves TLS only
    tls: RedisTLS | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/0"

    @property
    def access(self) -> RedisAccess:
        """The administrator's way in: the ``default`` user, over TLS when the server serves it."""
        return RedisAccess(password=self.password, tls=self.tls)

    def client(self, access: RedisAccess | None = None) -> redis.Redis:
        """A client as ``access`` (default: the administrator)."""
        options = (access or self.access).client_options()
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5, **options)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return self.process is None or self.process.poll() is None

    def stop(self, *, hard: bool = False, timeout: float = 10.0) -> None:
        """Ends the server and waits for it; ``hard`` kills it like a crash would (no save)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL if hard else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.05)
            else:
                time.sleep(0.05)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def start_redis(
    workdir: str | Path,
    *,
    port: int | None = None,
    password: str | None = None,
    cluster: bool = False,
    maxmemory: str | None = None,
    host: str = "127.0.0.1",
    detach: bool = False,
    persistence: RedisPersistenceSpec | None = None,
    tls: RedisServerTLS | None = None,
    acl_file: Path | None = None,
) -> RedisProcess:
    """Starts ``redis-server`` bound to ``host`` and waits until it answers PING (and, with an
    append-only file to replay, until it has loaded it).

    ``tls``: TLS only, on ``port``. ``acl_file``: its users (``password`` is then the ``default``
    user's in that file, used here to see it answer); without one, ``password`` is ``requirepass``.

    ``detach`` puts it in its own session so it outlives the caller (``hps local up`` returns while
    the stack keeps running); otherwise it is the caller's child. ``persistence`` (the model's
    ``volatileStore.redis.persistence``) makes it keep what it was given in ``workdir`` across restarts;
    without it nothing is kept (the tests' throwaway servers). A ``port`` that cannot be bound is an
    :class:`UnavailableError` naming it (a restart must come back on the address the agents know).
    """
    binary = redis_server_binary()
    # redis-server changes into --dir before opening --logfile: both must be absolute.
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(5):
        chosen = port or free_port(host, max_port=CLUSTER_MAX_PORT if cluster else 65535)
        kept = persistence.redis_args() if persistence is not None else ["--save", "", "--appendonly", "no"]
        listen = tls.args(chosen, cluster=cluster) if tls is not None else ["--port", str(chosen)]
        # protected mode stays on: it only refuses clients from other hosts when no password is set,
        # and this server listens on `host` alone
        args = [
            binary, "--bind", host, *listen, "--dir", str(wd), *kept, "--protected-mode", "yes",
            "--logfile", str(wd / f"redis-{chosen}.log"), "--daemonize", "no",
        ]  # fmt: skip
        if acl_file is not None:
            args += ["--aclfile", str(Path(acl_file).resolve())]
            if password:
                args += ["--masteruser", "default", "--masterauth", password]
        elif password:
            args += ["--requirepass", password, "--masterauth", password]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(wd / f"nodes-{chosen}.conf"),
                     "--cluster-node-timeout", "2000"]  # fmt: skip
        if maxmemory:
            args += ["--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=detach,
        )  # fmt: skip
        server = RedisProcess(host, chosen, wd, password, proc.pid, proc, tls.client() if tls is not None else None)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if server.client().ping():
                    return server
            except redis.BusyLoadingError as exc:  # replaying its append-only file: as long as it takes
                last_error = str(exc)
                deadline = max(deadline, time.monotonic() + _START_TIMEOUT_S)
            except redis.RedisError as exc:
                last_error = str(exc)
            time.sleep(0.02)
        server.stop(hard=True)
        log = wd / f"redis-{chosen}.log"
        last_error = log.read_text()[-500:] if log.exists() else last_error
        if port is not None:
            break
    raise UnavailableError(f"redis-server did not start in {wd}: {last_error.strip()}")


@dataclass
class RedisCluster:
    """A Redis Cluster of ``len(nodes)`` masters covering all 16384 hash slots."""

    nodes: list[RedisProcess]
    password: str | None

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    @property
    def access(self) -> RedisAccess:
        return self.nodes[0].access

    def client(self, access: RedisAccess | None = None) -> redis.RedisCluster:
        first = self.nodes[0]
        options = (access or self.access).client_options()
        return redis.RedisCluster(host=first.host, port=first.port, socket_timeout=5, **options)

    def stop(self, *, hard: bool = False) -> None:
        for node in self.nodes:
            node.stop(hard=hard)


def start_cluster(
    workdir: str | Path,
    *,
    masters: int = 3,
    password: str | None = None,
    host: str = "127.0.0.1",
    detach: bool = False,
    persistence: RedisPersistenceSpec | None = None,
    tls: RedisServerTLS | None = None,
    acl_file: Path | None = None,
) -> RedisCluster:
    """Starts ``masters`` cluster-enabled servers, splits the slots evenly with ``CLUSTER ADDSLOTSRANGE``,
    joins them with ``CLUSTER MEET`` and waits for ``cluster_state:ok`` on every node."""
    if masters < 1:
        raise ValueError("a Redis Cluster needs at least one master")
    wd = Path(workdir)
    nodes: list[RedisProcess] = []
    try:
        for i in range(masters):
            nodes.append(
                start_redis(wd / f"node-{i}", password=password, cluster=True, host=host, detach=detach,
                            persistence=persistence, tls=tls, acl_file=acl_file)
            )
        clients = [n.client() for n in nodes]
        per = 16384 // masters
        for i, c in enumerate(clients):
            lo = i * per
            hi = 16383 if i == masters - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", nodes[0].host, nodes[0].port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [c.execute_command("CLUSTER", "INFO") for c in clients]
            texts = [s.decode() if isinstance(s, bytes) else str(s) for s in states]
            if all("cluster_state:ok" in t and f"cluster_known_nodes:{masters}" in t for t in texts):
                return RedisCluster(nodes, password)
            time.sleep(0.05)
        raise UnavailableError(f"Redis Cluster of {masters} nodes in {wd} did not reach cluster_state:ok")
    except BaseException:
        for n in nodes:
            n.stop(hard=True)
        raise
