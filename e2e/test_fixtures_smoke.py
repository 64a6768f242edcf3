"""The scenario suite reaches the shared real-Redis fixtures (a Redis Cluster answers across slots)."""

from node_agent.local.redis_servers import RedisCluster


def test_cluster_serves_keys_in_every_slot_range(redis_cluster: RedisCluster) -> None:
    client = redis_cluster.client()
    keys = [f"{{smoke}}:{i}" for i in range(3)] + ["a", "b", "c", "d"]
    for i, key in enumerate(keys):
        client.set(key, i)
    assert [int(client.get(k)) for k in keys] == list(range(len(keys)))
    assert len({redis_cluster.client().keyslot(k) // (16384 // 3) for k in keys}) > 1
    client.delete(*keys[:3])
    for k in keys[3:]:
        client.delete(k)
