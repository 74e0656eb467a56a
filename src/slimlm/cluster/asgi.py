"""Drive the single server's FastAPI app (serve/app.py) in-process, without a socket.

Batch jobs and Ray Serve replicas run every request through the same app as `slimlm serve`, so
routes, auth, validation, errors, streaming and metrics are the server's by construction.
:class:`AppHost` owns the app's lifespan (its engine thread); :meth:`AppHost.call` yields the raw
ASGI response messages: one ``http.response.start`` (status, headers), then ``http.response.body``
chunks (SSE events arrive one by one). Closing the iterator early is a client disconnect: the
app aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI


class AppHost:
    def __init__(self, app: FastAPI):
        self.app = app
        self._lifespan: contextlib.AbstractAsyncContextManager | None = None

    async def start(self) -> None:
        """Run the app's startup (starts its AsyncEngine on the running loop); idempotent."""
        if self._lifespan is None:
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()

    async def stop(self) -> None:
        if self._lifespan is not None:
            cm, self._lifespan = self._lifespan, None
            await cm.__aexit__(None, None, None)

    async def call(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                   body: bytes = b"", query: str = "") -> AsyncIterator[dict[str, Any]]:
        await self.start()
        sent = asyncio.Queue()
        gone = asyncio.Event()
        body_given = False

        async def receive() -> dict[str, Any]:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await sent.put(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method.upper(),
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
            "root_path": "", "client": ("127.0.0.1", 0), "server": ("slimlm", 0), "state": {},
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers or []],
        }
        task = asyncio.create_task(self.app(scope, receive, send))
        try:
            while True:
                get = asyncio.create_task(sent.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the app returned; hand over what it sent, then stop
                    get.cancel()
                    while not sent.empty():
                        yield sent.get_nowait()
                    task.result()
                    return
                message = get.result()
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
        finally:
            gone.set()
            try:
                await asyncio.wait_for(task, 10)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the response is over either way
                task.cancel()

    async def request(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> tuple[int, bytes]:
        """The whole response: (status, body bytes)."""
        status, chunks = 500, []
        async for m in self.call(method, path, headers, body):
            if m["type"] == "http.response.start":
                status = m["status"]
            elif m["type"] == "http.response.body":
                chunks.append(m.get("body", b""))
        return status, b"".join(chunks)
