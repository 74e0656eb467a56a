"""OpenAI batch files: one request per input line, one record per output line.

Input line: ``{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
(``url`` may be left out: a body with ``messages`` is a chat request, one with ``prompt`` a
completion). Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`` with the body the server would have answered (errors included: a 400 is a response with
status 400). A line that is not a request (bad JSON, no body, no ``messages``/``prompt``) gets
``"response": null`` and an ``error`` naming its line. Every record carries ``line`` (1-based input
line), which is how a restarted job knows what is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.cluster.asgi import AppHost

ROUTES = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}


@dataclass
class Row:
    line: int
    custom_id: Any
    url: str
    body: dict[str, Any]


def error_record(line: int, custom_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{line}", "custom_id": custom_id, "line": line, "response": None,
            "error": {"code": code, "message": f"line {line}: {message}"}}


def parse_line(line: int, raw: str, model_name: str) -> Row | dict[str, Any] | None:
    """A Row, an error record, or None for a blank line."""
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return error_record(line, None, "invalid_json", f"not JSON ({e})")
    if not isinstance(obj, dict):
        return error_record(line, None, "invalid_line", "a line must be a JSON object")
    cid = obj.get("custom_id")
    body = obj.get("body")
    if not isinstance(body, dict):
        return error_record(line, cid, "invalid_line", "the line has no 'body' object")
    url = obj.get("url")
    if url is None:
        url = next((u for u, key in ROUTES.items() if key in body), None)
        if url is None:
            return error_record(line, cid, "invalid_body", "the body has neither 'messages' nor 'prompt'")
    if url not in ROUTES:
        return error_record(line, cid, "invalid_url", f"url {url!r} is not one of {sorted(ROUTES)}")
    if ROUTES[url] not in body:
        return error_record(line, cid, "invalid_body", f"a {url} body needs '{ROUTES[url]}'")
    if obj.get("method", "POST") != "POST":
        return error_record(line, cid, "invalid_method", f"method must be POST, got {obj.get('method')!r}")
    if body.get("stream"):
        return error_record(line, cid, "invalid_body", "stream is not supported in a batch")
    return Row(line, cid, url, {**body, "model": model_name})  # the job's model answers every row


async def run_row(host: AppHost, row: Row) -> dict[str, Any]:
    """The server's answer to one row, as an output record."""
    status, raw = await host.request("POST", row.url, [("content-type", "application/json")],
                                     json.dumps(row.body).encode())
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"error": {"message": raw.decode(errors="replace"), "type": "server_error"}}
    rid = body.get("id") if isinstance(body, dict) else None
    return {"id": f"batch_req_{row.line}", "custom_id": row.custom_id, "line": row.line,
            "response": {"status_code": status, "request_id": rid, "body": body}, "error": None}


def read_done(output: Path) -> set[int]:
    """Input lines already answered in ``output``; a torn last line (a killed job) is cut off."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline was being written at the kill
    done: set[int] = set()
    for raw in data[:keep].splitlines():
        try:
            done.add(int(json.loads(raw)["line"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{output} has a line that is not a batch record; refusing to append to it") from None
    if keep < len(data):
        with open(output, "r+b") as f:
            f.truncate(keep)
    return done


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())
