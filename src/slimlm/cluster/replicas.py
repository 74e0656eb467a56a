"""`slimlm serve --replicas N`: N engine replicas behind one OpenAI-compatible ingress, on Ray Serve.

Each replica (:class:`EngineReplica`, its own Serve deployment ``slimlm-replica-i``, so the ingress
can address it) loads the model once and runs the single server's app (serve/app.py) in-process
(cluster/asgi.py): routes, auth, validation, errors, streaming and per-replica metrics are the
single server's. The ingress (:class:`Ingress`) reads the body, tokenizes the prompt as the replica
will, asks the router (cluster/routing.py, ``--routing``) for a replica, and relays that replica's
raw response (status, headers, then each body chunk or SSE event).

Failures: Serve health-checks every replica (``check_health``: the engine thread is alive) and
replaces one whose process dies. The ingress probes replicas every ``PROBE_S`` seconds and routes
only to live ones; a request whose replica fails before its response started is retried on another
replica; one that fails mid-stream ends with an OpenAI-shaped error event and ``[DONE]`` (a
non-streaming answer is sent whole, so its replica's failure comes before it started and is
retried). ``GET /metrics`` merges every replica's metrics with a
``replica="i"`` label, plus the router's own (``slimlm_router_*``); ``GET /health`` is 200 while
at least one replica answers. Each response names its replica in the ``x-slimlm-replica`` header.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import threading
from typing import Any

from slimlm.cluster.asgi import AppHost
from slimlm.cluster.routing import ROUTERS, prefix_keys

PROBE_S = 2.0
"""Seconds between the ingress's liveness probes of each replica (also the probe's timeout)."""
ROUTE_BLOCKS = 8
"""Prefix blocks hashed for routing: enough to tell system prompts apart, cheap to hash."""
PROMPT_ROUTES = {"/v1/chat/completions", "/v1/completions"}


def load_tokenizer(model: str):
    """The model's tokenizer without its weights where the format allows (HF directories, named models)."""
    from pathlib import Path

    from slimlm.errors import ModelLoadError
    from slimlm.model.hub import KNOWN_MODELS, ensure_cached, load, newest_run_checkpoint
    from slimlm.tokenizer import Tokenizer

    path = ensure_cached(KNOWN_MODELS[model]) if model in KNOWN_MODELS else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model '{model}' not found: no such path, and not a known name "
                             f"({', '.join(KNOWN_MODELS)})")
    path = newest_run_checkpoint(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    return load(model).tokenizer  # GGUF: the tokenizer lives in the metadata


class EngineReplica:
    """One engine and the single server's app over it (a Ray Serve deployment of one replica)."""

    def __init__(self, spec: dict[str, Any], index: int):
        import torch

        from slimlm.engine.config import EngineConfig
        from slimlm.engine.engine import LLMEngine
        from slimlm.model.hub import load
        from slimlm.serve.app import build_app
        from slimlm.serve.config import ServeConfig

        torch.set_num_threads(spec.get("threads") or 1)
        cfg = EngineConfig(**spec["engine_kw"])
        engine = LLMEngine(load(spec["model"], dtype=cfg.dtype, device=cfg.device), cfg)
        self.app = build_app(engine, spec["name"], ServeConfig(**spec["serve_kw"]))
        self.host = AppHost(self.app)
        self.index = index

    async def handle(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, query: str = ""):
        """The app's ASGI response messages for one request (a streaming Serve call)."""
        async for message in self.host.call(method, path, headers, body, query):
            yield message

    async def ping(self) -> int:
        await self.host.start()
        return os.getpid()

    def check_health(self) -> None:
        state = self.app.state.slimlm
        if state.engine is not None and not state.engine._thread.is_alive():
            raise RuntimeError("the engine thread has stopped")


def _is_replica_failure(e: BaseException) -> bool:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import RayServeException

    try:
        from ray.exceptions import ActorUnavailableError
    except ImportError:  # older Ray
        ActorUnavailableError = RayActorError  # noqa: N806
    return isinstance(e, (RayActorError, ActorUnavailableError, RayServeException))


def _error(status: int, message: str, type_: str = "server_error", code: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status)


class Ingress:
    """Routes each request to a replica and relays its response (a Ray Serve deployment)."""

    def __init__(self, replicas: list, spec: dict[str, Any]):
        from prometheus_client import CollectorRegistry, Counter

        from slimlm.serve.chat_input import ChatEncoder

        self.replicas = replicas
        self.n = len(replicas)
        self.spec = spec
        self.serve_kw = spec["serve_kw"]
        self.tok = load_tokenizer(spec["model"])
        self.chat = ChatEncoder(self.tok)
        self.router = ROUTERS.get(spec["routing"])(self.n, spec["max_imbalance"])
        self.alive = [True] * self.n
        self._prober: asyncio.Task | None = None
        self.registry = r = CollectorRegistry()
        self.m_routed = Counter("slimlm_router_requests", "Requests routed, by replica", ["replica"], registry=r)
        self.m_matched = Counter("slimlm_router_prefix_blocks_matched", "Prefix blocks the chosen replica had been "
                                 "sent before, by replica", ["replica"], registry=r)
        self.m_retried = Counter("slimlm_router_retries", "Requests retried on another replica (nothing streamed "
                                 "yet)", registry=r)
        self.m_failed = Counter("slimlm_router_failed_midstream", "Requests whose replica failed after the "
                                "response started", registry=r)

    # ------------------------------------------------------------------ liveness
    async def _probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(i) for i in range(self.n)))
            await asyncio.sleep(PROBE_S)

    async def _probe(self, i: int) -> None:
        try:
            await asyncio.wait_for(self.replicas[i].ping.remote(), PROBE_S * 5 if not self.alive[i] else PROBE_S * 3)
            self.alive[i] = True
        except Exception:  # noqa: BLE001 - anything but an answer means: not now
            self.alive[i] = False

    # ------------------------------------------------------------------ routing
    def _route_keys(self, path: str, body: bytes, headers: dict[str, str]) -> list[bytes]:
        """The request's prefix keys, tokenized as the replica's app will; [] when unsure."""
        if path not in PROMPT_ROUTES:
            return []
        keys = self.serve_kw.get("api_keys") or []
        given = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if keys and given not in keys:
            return []  # the replica answers 401; do not tokenize for it
        try:
            data = json.loads(body)
            if path == "/v1/chat/completions":
                msgs = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                         "".join(p["text"] for p in m["content"])} for m in data["messages"]]
                ids = self.chat.encode(msgs, data.get("add_generation_prompt", True))
            else:
                p = data["prompt"]
                p = p[0] if isinstance(p, list) and len(p) == 1 and not isinstance(p[0], int) else p
                ids = self.tok.encode(p) if isinstance(p, str) else list(p)
            salt = []
            if self.serve_kw.get("cache_isolation") == "key" and given:
                salt.append("key:" + hashlib.sha256(given.encode()).hexdigest())
            if data.get("cache_salt"):
                salt.append("salt:" + str(data["cache_salt"]))
            return prefix_keys(ids, self.spec["block_size"], ROUTE_BLOCKS, "\n".join(salt))
        except Exception:  # noqa: BLE001 - malformed bodies are the replica's to refuse
            return []

    async def __call__(self, request):
        from starlette.responses import StreamingResponse

        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())
        path, method, query = request.url.path, request.method, request.url.query
        body = await request.body()
        if len(body) > self.serve_kw.get("max_body_bytes", 4 << 20):
            return _error(413, "request body too large", "invalid_request_error", "body_too_large")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
        if path == "/health":
            return await self._health()
        if path == "/metrics":
            return await self._metrics(headers)
        keys = await asyncio.to_thread(self._route_keys, path, body, dict(request.headers))
        tried: set[int] = set()
        while True:
            live = [self.alive[i] and i not in tried for i in range(self.n)]
            if not any(live):
                return _error(503, "no replica is available; retry shortly", code="no_replica")
            choice = self.router.choose(keys, live)
            r = choice.replica
            self.router.started(r)
            gen = self.replicas[r].options(stream=True).handle.remote(method, path, headers, body, query)
            try:
                start = await gen.__anext__()
                break
            except Exception as e:  # noqa: BLE001
                self.router.finished(r)
                if not _is_replica_failure(e):
                    raise
                self.alive[r] = False
                tried.add(r)
                self.m_retried.inc()
        self.m_routed.labels(str(r)).inc()
        self.m_matched.labels(str(r)).inc(choice.matched_blocks)
        raw = [(bytes(k), bytes(v)) for k, v in start.get("headers", [])]
        sse = any(k.lower() == b"content-type" and b"event-stream" in v for k, v in raw)
        resp = StreamingResponse(self._relay(gen, r, sse), status_code=start["status"])
        resp.raw_headers = [(k, v) for k, v in raw if k.lower() != b"content-length"]
        resp.raw_headers.append((b"x-slimlm-replica", str(r).encode()))
        return resp

    async def _relay(self, gen, r: int, sse: bool):
        try:
            async for message in gen:
                if message["type"] != "http.response.body":
                    continue
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
        except Exception as e:  # noqa: BLE001
            if not _is_replica_failure(e):
                raise
            self.alive[r] = False
            self.m_failed.inc()
            if sse:
                err = {"error": {"message": f"replica {r} failed while streaming this response; retry",
                                 "type": "server_error", "param": None, "code": "replica_failed"}}
                yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.router.finished(r)
            gen.cancel()

    # ------------------------------------------------------------------ health and metrics
    async def _ask(self, i: int, path: str, headers) -> tuple[int, bytes] | None:
        async def whole():
            status, chunks = 500, []
            async for m in self.replicas[i].options(stream=True).handle.remote("GET", path, headers, b""):
                if m["type"] == "http.response.start":
                    status = m["status"]
                elif m["type"] == "http.response.body":
                    chunks.append(m.get("body", b""))
            return status, b"".join(chunks)

        try:
            return await asyncio.wait_for(whole(), PROBE_S * 3) if self.alive[i] else None
        except Exception:  # noqa: BLE001
            return None

    async def _health(self):
        from starlette.responses import JSONResponse

        got = await asyncio.gather(*(self._ask(i, "/health", []) for i in range(self.n)))
        states = ["ok" if g and g[0] == 200 else "down" for g in got]
        ok = "ok" in states
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": states}, 200 if ok else 503)

    async def _metrics(self, headers):
        from prometheus_client import generate_latest
        from starlette.responses import Response

        got = await asyncio.gather(*(self._ask(i, "/metrics", headers) for i in range(self.n)))
        for g in got:
            if g is not None and g[0] != 200:  # metrics auth: the replica's own refusal
                return Response(g[1], g[0], media_type="application/json")
        text = generate_latest(self.registry).decode() + merge_metrics(
            {i: g[1].decode() for i, g in enumerate(got) if g is not None})
        return Response(text, media_type="text/plain; version=0.0.4")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def merge_metrics(texts: dict[int, str]) -> str:
    """Prometheus texts of several replicas as one, each sample labelled ``replica="i"``."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for i, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            doc, kind, lines = families.setdefault(fam.name, (fam.documentation, fam.type, []))
            for s in fam.samples:
                labels = {**s.labels, "replica": str(i)}
                lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{s.name}{{{lab}}} {s.value!r}")
    out = []
    for name, (doc, kind, lines) in families.items():
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------------- starting it
def build_application(spec: dict[str, Any], replicas: int, cpus_per_replica: float = 1.0):
    """The Serve application: ``replicas`` one-replica deployments and the ingress over them."""
    from ray import serve

    max_queue = spec["serve_kw"].get("max_queue", 256)
    engines = [
        serve.deployment(EngineReplica, name=f"slimlm-replica-{i}", num_replicas=1,
                         ray_actor_options={"num_cpus": cpus_per_replica}, max_ongoing_requests=max_queue + 16,
                         health_check_period_s=5, health_check_timeout_s=60).bind(spec, i)
        for i in range(replicas)
    ]
    ingress = serve.deployment(Ingress, name="slimlm-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=spec["serve_kw"].get("max_connections", 1024))
    return ingress.bind(engines, spec)


def replica_spec(model: str, name: str, engine_kw: dict[str, Any], serve_kw: dict[str, Any], routing: str = "prefix",
                 max_imbalance: int = 4, threads: int | None = None) -> dict[str, Any]:
    from slimlm.engine.config import EngineConfig

    ROUTERS.get(routing)  # unknown names: one line listing the known ones
    if max_imbalance < 0:
        raise ValueError(f"--max-imbalance must be >= 0, got {max_imbalance}")
    return {"model": model, "name": name, "engine_kw": engine_kw, "serve_kw": serve_kw, "routing": routing,
            "max_imbalance": max_imbalance, "threads": threads,
            "block_size": engine_kw.get("block_size", EngineConfig.block_size)}


def start(spec: dict[str, Any], replicas: int, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, on_connect=None) -> None:
    """Start (or join) Ray, then the replicas and the ingress on http://host:port; returns when
    ready. ``on_connect()`` runs once Ray is connected (the caller re-installs its signal handlers)."""
    from slimlm.cluster.ray_env import init_ray

    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    init_ray(address, num_cpus=None if address else max(replicas, os.cpu_count() or 1))
    if on_connect is not None:
        on_connect()
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(spec, replicas), name="slimlm", route_prefix="/")


def _own_signals(handler) -> None:
    """(Re-)install ``handler`` for SIGTERM / SIGINT. Ray installs handlers of its own when it
    connects: a Python one that exits with the signal number, and a C++ one (behind Python's
    back, so ``signal.getsignal`` does not show it) that logs and then aborts the process.
    ``signal.signal`` always re-installs at the C level, so this is done unconditionally."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def serve_on_ray(a, serve_kw: dict[str, Any], engine_kw: dict[str, Any]) -> int:
    """`slimlm serve --replicas N [--ray-address A]`: run until SIGTERM / Ctrl-C."""
    from slimlm.cluster.ray_env import require_ray
    from slimlm.errors import SlimLMError

    require_ray()  # without the extra: one line saying how to install it
    name = a.served_model_name or a.model
    spec = replica_spec(a.model, name, engine_kw, serve_kw, a.routing, a.max_imbalance, a.threads)
    if load_tokenizer(a.model) is None:  # a bad --model fails here, not in every replica
        raise SlimLMError(f"{a.model} has no tokenizer; the server needs one")
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    # Ray installs its own driver handler (sys.exit(signum)) when it connects, and may again
    # later: a SIGTERM at any point, start-up included, ends in the same clean drain
    _own_signals(on_signal)
    try:
        start(spec, a.replicas, a.host, a.port, a.ray_address, on_connect=lambda: _own_signals(on_signal))
    except SystemExit:
        stop.set()
    except (RuntimeError, OSError) as e:
        raise SlimLMError(f"could not start the replicas: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not stop.is_set():
        print(f"slimlm: serving '{name}' on http://{a.host}:{a.port}/v1 with {a.replicas} replicas on Ray Serve "
              f"(routing: {a.routing})", file=sys.stderr)
    try:
        while not stop.is_set():
            _own_signals(on_signal)
            stop.wait(1.0)
    except SystemExit:
        pass
    from ray import serve

    serve.delete("slimlm")
    if not a.ray_address:
        serve.shutdown()
    return 0
