"""Scenario tests share the unit tests' real-redis fixtures."""

from tests.conftest import make_redis, redis_cluster, redis_server

__all__ = ["make_redis", "redis_cluster", "redis_server"]
