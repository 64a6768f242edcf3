"""The real redis-server launcher: what `hps local up` and every Redis test stand on."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from node_agent.local.redis_servers import CLUSTER_MAX_PORT, RedisCluster, free_port, start_redis


def test_cluster_ports_leave_room_for_the_bus_port(redis_cluster: RedisCluster) -> None:
    assert all(node.port <= CLUSTER_MAX_PORT for node in redis_cluster.nodes)
    assert all(free_port(max_port=CLUSTER_MAX_PORT) <= CLUSTER_MAX_PORT for _ in range(20))


def test_password_is_required_and_a_hard_stop_leaves_nothing_running(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "r", password="s3cret")
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, password="wrong").ping()
        assert server.client().ping()
    finally:
        server.stop(hard=True)
    assert not server.alive()
    with pytest.raises(redis.ConnectionError):
        server.client().ping()
