"""Prometheus metrics for ``GET /metrics`` (text exposition format)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("slimlm_requests", "Requests received, by outcome", ["outcome"], registry=r)
        self.tokens_in = Counter("slimlm_prompt_tokens", "Prompt tokens received", registry=r)
        self.tokens_cached = Counter("slimlm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix "
                                     "cache (finished requests)", registry=r)
        self.tokens_out = Counter("slimlm_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("slimlm_requests_running", "Sequences running in the engine", registry=r)
        self.waiting = Gauge("slimlm_requests_waiting", "Sequences waiting in the engine", registry=r)
        self.kv_used = Gauge("slimlm_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_free = Gauge("slimlm_kv_blocks_free", "KV blocks free (incl. reusable cached ones)", registry=r)
        self.kv_bytes = Gauge("slimlm_kv_bytes_in_use", "KV bytes the blocks in use hold (all layers, in the "
                              "KV cache dtype's format)", registry=r)
        self.ttft = Histogram("slimlm_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("slimlm_time_per_output_token_seconds", "Time per output token after the first",
                             buckets=LATENCY_BUCKETS, registry=r)

    def render(self, engine) -> bytes:
        sched = engine.scheduler
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_used.set(engine.pool.num_used())
        self.kv_free.set(engine.pool.num_free())
        self.kv_bytes.set(engine.kv_bytes_in_use())
        return generate_latest(self.registry)
