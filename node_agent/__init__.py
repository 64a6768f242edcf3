"""hps node agent: the data plane (cache, tiers, lookup path, gRPC server, loader, updates, client)."""
