"""KV cache: the block pool, prefix cache, per-sequence block tables and eviction policies."""
