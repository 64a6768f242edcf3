"""Shared fixtures: real ``redis-server`` processes on free loopback ports (standalone and a
3-master Redis Cluster), started once per session and stopped at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_agent.local.redis_servers import RedisCluster, RedisProcess, start_cluster, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A standalone redis-server with AUTH, shared by the session: flush what you write."""
    server = start_redis(tmp_path_factory.mktemp("redis"), password="test-secret")
    yield server
    server.stop(hard=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster (all 16384 slots assigned), shared by the session."""
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"), masters=3, password="test-secret")
    yield cluster
    cluster.stop(hard=True)


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Factory for private redis-servers a test may kill; all are stopped after the test."""
    started: list[RedisProcess] = []

    def make(**kwargs: object) -> RedisProcess:
        server = start_redis(tmp_path / f"redis-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(hard=True)
