"""Load test: N concurrent streaming clients against `slimlm serve` for a bounded time.

Starts the server in its own process on a free loopback port, runs ``clients`` asyncio
clients (httpx, streaming chat completions) that each send requests back to back until the
deadline, then waits (bounded) for the streams in flight. Reports completed and failed
requests, incomplete streams, generated tokens/s and time-to-first-token percentiles.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
    "List three uses of Python.", "Why is the sky blue?", "Give me a tip for learning to cook.",
    "What does a CPU do?", "Summarise the plot of Hamlet in two sentences.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _client(i: int, url: str, model: str, deadline: float, max_tokens: int, stats: dict) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        k = 0
        while time.perf_counter() < deadline:
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": i * 1000 + k,
                    "messages": [{"role": "user", "content": QUESTIONS[(i + k) % len(QUESTIONS)]}],
                    "stream_options": {"include_usage": True}}
            k += 1
            t0 = time.perf_counter()
            ttft, done, tokens = None, False, 0
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        stats["failed"] += 1
                        stats["errors"].append(f"HTTP {r.status_code}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            stats["errors"].append(chunk["error"]["message"])
                            break
                        if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                            ttft = time.perf_counter() - t0
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            except Exception as e:  # noqa: BLE001 - counted as a failure
                stats["failed"] += 1
                stats["errors"].append(repr(e)[:200])
                continue
            if done:
                stats["completed"] += 1
                stats["tokens"] += tokens
                if ttft is not None:
                    stats["ttft"].append(ttft)
            else:
                stats["incomplete"] += 1


async def _drive(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    stats: dict[str, Any] = {"completed": 0, "failed": 0, "incomplete": 0, "tokens": 0, "ttft": [], "errors": []}
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(i, url, model, t0 + seconds, max_tokens, stats) for i in range(clients)))
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def run(model: str, clients: int = 64, seconds: float = 60, max_tokens: int = 64, threads: int = 2,
        engine_args: list[str] | None = None, log=print) -> dict[str, Any]:
    from slimlm.bench.machine import machine_info

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "slimlm.cli", "serve", "--model", model, "--port", str(port),
           "--threads", str(threads), "--max-queue", str(max(256, clients * 2)), *(engine_args or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        import httpx

        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-500:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not come up in 180 s")
            time.sleep(0.5)
        log(f"server up on {url}; {clients} clients for {seconds:.0f} s")
        stats = asyncio.run(_drive(url, model, clients, seconds, max_tokens))
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
    ttft = stats.pop("ttft")
    return {
        "scenario": "serve", "settings": {"model": model, "clients": clients, "seconds": seconds,
                                          "max_tokens": max_tokens, "engine_args": engine_args or []},
        "machine": machine_info(threads), **stats,
        "tokens_per_s": stats["tokens"] / stats["wall_s"],
        "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
        "server_exit_code": rc, "kv_blocks_used_at_end": _metric(metrics, "slimlm_kv_blocks_used"),
    }


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        "| clients | seconds | completed | failed | incomplete | generated tok/s | TTFT p50 | TTFT p99 |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['settings']['clients']} | {r['wall_s']:.0f} | {r['completed']} | {r['failed']} | {r['incomplete']} | "
        f"{r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s |",
    ])
