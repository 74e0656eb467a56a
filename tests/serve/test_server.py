"""A real server on a free localhost port, driven by the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from slimlm import LLM, SamplingParams
from slimlm.engine.engine import LLMEngine
from slimlm.engine.config import EngineConfig
from slimlm.engine.hooks import LayerHook
from slimlm.model.hub import load
from slimlm.serve.app import build_app

MODEL = "tiny"
KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, engine, **kw):
        self.port = free_port()
        self.engine = engine
        app = build_app(engine, MODEL, **kw)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


@pytest.fixture(scope="module")
def server(tiny):
    s = Server(LLMEngine(tiny, EngineConfig(kv_cache_bytes=8 << 20)), api_key=KEY, max_queue=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def reference(tiny, prompt, **kw):
    return LLM(tiny).generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_greedy_equals_llm_generate(tiny, client):
    r = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0)
    ref = reference(tiny, "The quick brown", temperature=0, max_tokens=12)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(tiny.tokenizer.encode("The quick brown"))


def test_chat_completion(tiny, client):
    msgs = [{"role": "user", "content": "Small language models are"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    ref = LLM(tiny).chat(msgs, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"


def test_streaming_with_usage(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=14, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    comp = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0, stream=True))
    ref = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in comp) == ref.choices[0].text


def test_n2_stop_and_seed(tiny, client):
    r = client.completions.create(model=MODEL, prompt="Paged attention", max_tokens=8, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    again = client.completions.create(model=MODEL, prompt="Paged attention", max_tokens=8, n=2, temperature=1.0,
                                      seed=3)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    full = reference(tiny, "Paged attention", temperature=0, max_tokens=12).text
    stop = full.strip()[2:4]
    s = client.completions.create(model=MODEL, prompt="Paged attention", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].text == full[: full.index(stop)] and s.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 for c in content)
    c = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == len(c.choices[0].logprobs.tokens)


def post(server, path, body, key=KEY, raw=False):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=body if raw else json.dumps(body), headers=headers, timeout=30)


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"model": MODEL}, 400, "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 2}, 400, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
])
def test_errors_are_openai_shaped_and_server_keeps_serving(server, client, body, status, param):
    r = post(server, "/v1/chat/completions", body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices


def test_auth(server):
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key="wrong").status_code == 401
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


class Slow(LayerHook):
    """Makes each engine step take a while, so a request is surely mid-flight."""

    def begin_step(self, info):
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_kv(server):
    server.engine.runner.hooks.append(Slow())
    pool = server.engine.pool
    held_during = 0
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                held_during = sum(1 for c in pool.ref_count if c > 0)
                break  # leave mid-stream
    deadline = time.time() + 10
    while time.time() < deadline:
        held = sum(1 for c in pool.ref_count if c > 0)
        if held == 0 and not server.engine.has_unfinished():
            break
        time.sleep(0.1)
    server.engine.runner.hooks.pop()
    assert held_during > 0
    assert sum(1 for c in pool.ref_count if c > 0) == 0  # back to baseline
    assert not server.engine.requests


def test_queue_full_gives_429(tiny):
    s = Server(LLMEngine(tiny, EngineConfig(kv_cache_bytes=8 << 20)), max_queue=1)
    s.engine.runner.hooks.append(Slow())
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r1:
            lines = r1.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(lines)
            r2 = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "y"}, timeout=30)
            assert r2.status_code == 429 and r2.json()["error"]["code"] == "queue_full"
    finally:
        s.stop()


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ["slimlm_requests_running", "slimlm_requests_waiting", "slimlm_prompt_tokens_total",
                 "slimlm_generation_tokens_total", "slimlm_kv_blocks_used", "slimlm_kv_blocks_free",
                 "slimlm_kv_bytes_in_use",
                 "slimlm_time_to_first_token_seconds_bucket", "slimlm_time_per_output_token_seconds_bucket"]:
        assert name in text, name


def test_sigterm_graceful_shutdown(tiny_llama_dir):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimlm.cli", "serve", "--model", str(tiny_llama_dir),
                             "--port", str(port), "--kv-cache-bytes", str(8 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": str(tiny_llama_dir), "prompt": "hello", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_segments_field_set_based_prompt(tiny, server, client):
    sets = ["Paged attention", "Once upon a time", "The quick brown fox"]
    segs = lambda order: ["Small language", {"set": [sets[i] for i in order]}, " models are"]  # noqa: E731
    texts = []
    for order in ([0, 1, 2], [2, 0, 1]):
        r = post(server, "/v1/completions", {"model": MODEL, "segments": segs(order), "max_tokens": 8,
                                             "temperature": 0})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    ref = LLM(tiny).generate([{"segments": segs([1, 2, 0])}], SamplingParams(temperature=0, max_tokens=8),
                             use_tqdm=False)[0].outputs[0].text
    assert texts == [ref, ref]
    for body, msg in [({"segments": ["a", {"set": ["b"]}]}, "at least 2 elements"),
                      ({"segments": ["a"], "prompt": "b"}, "exactly one of"),
                      ({"segments": [{"ids": [5] * 400}]}, "")]:
        r = post(server, "/v1/completions", {"model": MODEL, "max_tokens": 2, **body})
        assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


def test_chat_messages_with_segments(tiny, server):
    sets = ["Paged attention", "Once upon a time", "The quick brown fox"]

    def body(order, **kw):
        return {"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "segments": ["Which is a story opening?", {"set": [sets[i] for i in order]}], **kw}]}

    texts = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        r = post(server, "/v1/chat/completions", body(order))
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
    assert texts[0] == texts[1] == texts[2]
    # the same prompt through LLM.generate: the template's text around the message's segments
    from slimlm.engine.segments import chat_segments

    tok = LLM(tiny).tokenizer
    msgs = body([0, 1, 2])["messages"]
    segs = chat_segments(msgs, lambda m: tok.apply_chat_template(m, add_generation_prompt=True),
                         lambda t: tok.encode(t, add_special_tokens=False),
                         lambda t: tok.encode(t, add_special_tokens=False))
    ref = LLM(tiny).generate([{"segments": segs}], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert texts[0] == ref[0].outputs[0].text
    for bad, msg in [({"segments": ["a", {"set": ["b"]}]}, "at least 2 elements"),
                     ({"segments": ["a"], "content": "b"}, "not both"),
                     ({"segments": []}, "non-empty")]:
        r = post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                  "messages": [{"role": "user", **bad}]})
        assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text
