"""`slimlm serve`: run the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys


def cmd_serve(a: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from slimlm.engine.config import EngineConfig
    from slimlm.engine.engine import LLMEngine
    from slimlm.engine.options import engine_config_from_args
    from slimlm.model.hub import load
    from slimlm.serve.app import build_app
    from slimlm.serve.server import GracefulServer

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = EngineConfig(**engine_config_from_args(a))
    lm = load(a.model, dtype=cfg.dtype, device=cfg.device)
    if lm.tokenizer is None:
        from slimlm.errors import SlimLMError

        raise SlimLMError(f"{a.model} has no tokenizer; the server needs one")
    engine = LLMEngine(lm, cfg)
    name = a.served_model_name or a.model
    app = build_app(engine, name, api_key=a.api_key, max_queue=a.max_queue, default_max_tokens=a.default_max_tokens)
    print(f"slimlm: serving '{name}' on http://{a.host}:{a.port}/v1 "
          f"({engine.pool.num_blocks} KV blocks of {cfg.block_size} tokens)", file=sys.stderr)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    GracefulServer(config).run()
    return 0


def register(sub) -> None:
    from slimlm.engine.options import add_engine_args
    from slimlm.model.hub import DEFAULT_MODEL

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")
    s.add_argument("--default-max-tokens", type=int, default=256)
    s.add_argument("--log-level", default="warning")
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)
