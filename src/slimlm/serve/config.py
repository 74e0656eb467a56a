"""ServeConfig: every limit of the HTTP server, validated on construction (docs/security.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class ServeConfig:
    api_keys: list[str] = field(default_factory=list)
    """Keys accepted as ``Authorization: Bearer KEY`` on /v1/* (empty: no auth)."""
    max_queue: int = 256
    """Sequences (a request with ``n`` counts ``n``) in flight before new requests get 429."""
    default_max_tokens: int = 256
    """``max_tokens`` when a request gives none (clipped to what the context has left)."""
    max_n: int = 8
    """Largest ``n`` a request may ask for: each sample is a sequence with its own KV."""
    max_body_bytes: int = 4 << 20
    """Largest request body; longer ones get 413 before they are parsed or tokenized."""
    read_timeout_s: float = 30.0
    """A request body that does not arrive within this many seconds gets 408 (stalled uploads)."""
    max_connections: int = 1024
    """Concurrent connections (uvicorn's ``limit_concurrency``; past it: 503)."""
    keep_alive_s: float = 5.0
    """Idle keep-alive connections are closed after this long (uvicorn's ``timeout_keep_alive``)."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM, in-flight requests get this long to finish; then each remaining stream ends
    with an error event and [DONE], each remaining non-streaming request with a JSON 503."""
    metrics_auth: bool = False
    """Require the API key on /metrics too."""
    cache_isolation: str = "none"
    """Prefix-cache sharing: "none" (all requests share cached prefixes), "key" (only requests
    with the same API key share). A request's ``cache_salt`` further narrows sharing (vLLM)."""
    stats_interval_s: float = 10.0
    """Seconds between periodic stats log lines while the server is busy (0: never)."""
    access_log: bool = True
    """One log line per request (id, status, tokens, TTFT, total time)."""

    def __post_init__(self) -> None:
        for name in ("max_queue", "default_max_tokens", "max_n", "max_body_bytes", "max_connections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("read_timeout_s", "keep_alive_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.stats_interval_s < 0:
            raise ValueError(f"stats_interval_s must be >= 0, got {self.stats_interval_s!r}")
        if self.cache_isolation not in ("none", "key"):
            raise ValueError(f"cache_isolation must be 'none' or 'key', got {self.cache_isolation!r}")
        if any(not k for k in self.api_keys):
            raise ValueError("api_keys must not contain an empty key")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
