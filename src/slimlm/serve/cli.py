"""`slimlm serve`: run the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _log_setup(level: str) -> None:
    """slimlm.serve's access and stats lines at INFO whatever uvicorn's own level is."""
    log = logging.getLogger("slimlm.serve")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s slimlm: %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)
    log.setLevel(logging.DEBUG if level in ("debug", "trace") else logging.INFO)
    log.propagate = False


def cmd_serve(a: argparse.Namespace) -> int:
    import torch

    from slimlm.engine.config import EngineConfig
    from slimlm.engine.engine import LLMEngine
    from slimlm.engine.options import engine_config_from_args
    from slimlm.errors import SlimLMError
    from slimlm.model.hub import load
    from slimlm.serve.app import build_app
    from slimlm.serve.config import ServeConfig
    from slimlm.serve.server import GracefulServer, uvicorn_config

    keys = list(a.api_key or [])
    if os.environ.get("SLIMLM_API_KEY"):
        keys.append(os.environ["SLIMLM_API_KEY"])
    try:
        serve_cfg = ServeConfig(
            api_keys=keys, max_queue=a.max_queue, default_max_tokens=a.default_max_tokens, max_n=a.max_n,
            max_body_bytes=a.max_body_bytes, read_timeout_s=a.read_timeout, max_connections=a.max_connections,
            keep_alive_s=a.keep_alive_timeout, shutdown_timeout_s=a.shutdown_timeout, metrics_auth=a.metrics_auth,
            cache_isolation=a.cache_isolation, stats_interval_s=a.stats_interval, access_log=not a.no_access_log)
    except ValueError as e:
        raise SlimLMError(str(e)) from None
    if serve_cfg.metrics_auth and not keys:
        raise SlimLMError("--metrics-auth needs --api-key (or SLIMLM_API_KEY)")
    if a.replicas < 1:
        raise SlimLMError(f"--replicas must be at least 1, got {a.replicas}")
    if a.replicas > 1 or a.ray_address:  # Ray Serve: cluster/replicas.py
        from dataclasses import asdict

        from slimlm.cluster.replicas import serve_on_ray

        return serve_on_ray(a, asdict(serve_cfg), engine_config_from_args(a))
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = EngineConfig(**engine_config_from_args(a))
    lm = load(a.model, cfg.dtype, cfg.device, cfg.weights, cfg.weights_group_size)
    if lm.tokenizer is None:
        raise SlimLMError(f"{a.model} has no tokenizer; the server needs one")
    engine = LLMEngine(lm, cfg)
    name = a.served_model_name or a.model
    _log_setup(a.log_level)
    app = build_app(engine, name, serve_cfg)
    print(f"slimlm: serving '{name}' on http://{a.host}:{a.port}/v1 "
          f"({engine.pool.num_blocks} KV blocks of {cfg.block_size} tokens)", file=sys.stderr)
    config = uvicorn_config(app, a.host, a.port, serve_cfg, a.log_level)
    GracefulServer(config, app.state.slimlm, serve_cfg.shutdown_timeout_s).run()
    return 0


def register(sub) -> None:
    from slimlm.cluster.routing import ROUTERS
    from slimlm.engine.options import add_engine_args
    from slimlm.model.hub import DEFAULT_MODEL
    from slimlm.serve.config import ServeConfig

    d = ServeConfig()
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (limits: docs/security.md)")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (repeat for several keys; also SLIMLM_API_KEY)")
    s.add_argument("--max-queue", type=int, default=d.max_queue, help="sequences in flight before 429")
    s.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    s.add_argument("--max-n", type=int, default=d.max_n, help="largest n (samples) a request may ask for")
    s.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    s.add_argument("--read-timeout", type=float, default=d.read_timeout_s,
                   help="seconds a request body may take to arrive (408 past it)")
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="concurrent connections (503 past it)")
    s.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_s, help="idle keep-alive seconds")
    s.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s,
                   help="seconds in-flight requests get to finish after SIGTERM")
    s.add_argument("--metrics-auth", action="store_true", help="require the API key on /metrics")
    s.add_argument("--cache-isolation", choices=["none", "key"], default=d.cache_isolation,
                   help="'key': only requests with the same API key share cached prefixes")
    s.add_argument("--stats-interval", type=float, default=d.stats_interval_s,
                   help="seconds between stats log lines (0: off)")
    s.add_argument("--no-access-log", action="store_true", help="no per-request log line")
    s.add_argument("--log-level", default="warning", help="uvicorn's log level")
    r = s.add_argument_group("replicas", "several engines behind one ingress on Ray Serve (pip install "
                                         "slimlm[ray]; docs/deployment.md)")
    r.add_argument("--replicas", type=int, default=1, help="engine replicas (more than 1: Ray Serve)")
    r.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (HOST:PORT, ray://HOST:PORT); default: start a local one")
    r.add_argument("--routing", default="prefix", choices=ROUTERS.names(),
                   help="prefix: requests sharing their first KV blocks go to the same replica")
    r.add_argument("--max-imbalance", type=int, default=4,
                   help="prefix routing: requests in flight a replica may have above the least-loaded one")
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)
