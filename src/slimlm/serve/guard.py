"""The server's front door, as plain ASGI middleware (it runs before FastAPI parses anything).

In order: refuse new requests while shutting down (503), check the API key (401), check the
Content-Type of POST bodies (415), read the whole body within ``max_body_bytes`` (413) and
``read_timeout_s`` (408), then hand the body to the app; after the response, write one access-log
line. Errors use OpenAI's JSON shape. A client that goes away while uploading costs nothing more.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable

from slimlm.serve.config import ServeConfig

log = logging.getLogger("slimlm.serve")


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


async def send_error(send, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(message, type_, param, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def key_matches(header: str, keys: list[str]) -> str | None:
    """The API key in ``Authorization: Bearer KEY`` (scheme case-insensitive) if it is one of ``keys``."""
    scheme, _, got = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    got = got.strip()
    found = None
    for k in keys:  # compare against every key in constant time
        if hmac.compare_digest(got.encode(), k.encode()):
            found = k
    return found


class Guard:
    def __init__(self, app, config: ServeConfig, draining: Callable[[], bool]):
        self.app, self.config, self.draining = app, config, draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self._handle(scope, receive, send_logged)
        finally:
            if self.config.access_log and scope["path"].startswith("/v1/"):
                self._access_line(scope, status[0] or 499, time.perf_counter() - t0)

    async def _handle(self, scope, receive, send):
        cfg, path = self.config, scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scope.setdefault("state", {})["access"] = {}  # filled by the handlers, written out by _access_line
        if path.startswith("/v1/") and self.draining():
            return await send_error(send, 503, "the server is shutting down", "server_error",
                                    code="server_shutting_down", headers=[(b"retry-after", b"5")])
        needs_key = path.startswith("/v1/") or (path == "/metrics" and cfg.metrics_auth)
        if cfg.api_keys and needs_key:
            key = key_matches(headers.get("authorization", ""), cfg.api_keys)
            if key is None:
                return await send_error(send, 401, "invalid or missing API key", "authentication_error",
                                        code="invalid_api_key")
            scope["state"]["api_key"] = key
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        ctype = headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
            return await send_error(send, 415, f"Content-Type must be application/json, got {ctype!r}",
                                    code="unsupported_media_type")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await send_error(send, 400, f"bad Content-Length {declared!r}")
            if int(declared) > cfg.max_body_bytes:
                return await self._too_large(send, int(declared))
        body = await self._read_body(receive, send)
        if body is None:
            return
        done = False

        async def replay():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: int) -> None:
        await send_error(send, 413, f"request body of {size} bytes is over the limit of "
                                    f"{self.config.max_body_bytes} bytes (--max-body-bytes)", code="body_too_large",
                         headers=[(b"connection", b"close")])

    async def _read_body(self, receive, send) -> bytes | None:
        """The body, or None once an error was sent (or the client left)."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.config.read_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await send_error(send, 408, f"the request body did not arrive within {self.config.read_timeout_s:g} s",
                                 code="request_timeout", headers=[(b"connection", b"close")])
                return None
            if msg["type"] == "http.disconnect":
                return None
            part = msg.get("body", b"")
            size += len(part)
            if size > self.config.max_body_bytes:
                await self._too_large(send, size)
                return None
            chunks.append(part)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _access_line(scope, status: int, seconds: float) -> None:
        a = scope.get("state", {}).get("access", {})
        ttft = a.get("ttft")
        log.info("%s %s %s %d prompt=%s output=%s ttft=%s total=%.3fs", a.get("id", "-"), scope["method"],
                 scope["path"], status, a.get("prompt_tokens", "-"), a.get("output_tokens", "-"),
                 f"{ttft:.3f}s" if ttft is not None else "-", seconds)
