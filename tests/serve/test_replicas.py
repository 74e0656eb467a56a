"""`slimlm serve --replicas 2` on a local Ray Serve: routing, metrics, errors, a killed replica.

One local Ray instance and one deployment for the whole module (Ray starts slowly on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.multiprocess  # several processes: `make test-all` (pyproject.toml)

ray = pytest.importorskip("ray")

from slimlm.cli import main  # noqa: E402
from slimlm.cluster import replicas  # noqa: E402
from tests.conftest import make_hf_model  # noqa: E402
from tests.serve.test_server import free_port  # noqa: E402

KEY = "sk-replicas"
SYSTEMS = [f"You are assistant number {g}. " + "Paged attention stores keys and values in blocks. " * 4
           for g in range(4)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    model = tmp_path_factory.mktemp("tiny-long")  # the tiny model with room for requests that outlive a kill
    make_hf_model(model, "llama", max_position_embeddings=2048)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    port = free_port()
    spec = replicas.replica_spec(str(model), "tiny", {"max_num_seqs": 16},
                                 {"api_keys": [KEY], "stats_interval_s": 0, "access_log": False}, threads=1)
    replicas.start(spec, 2, port=port)
    url = f"http://127.0.0.1:{port}"
    yield url
    serve.shutdown()
    if started:
        ray.shutdown()
    for sig, handler in handlers.items():  # ray.init turns SIGTERM into SystemExit in this process
        signal.signal(sig, handler)


def post(url, path, body, key=KEY, timeout=120):
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {},
                      timeout=timeout)


def chat(system, user, **kw):
    return {"model": "tiny", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0, **kw}


def metric(text: str, name: str, replica: int) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'replica="{replica}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_concurrent_requests_errors_and_auth_through_the_ingress(cluster):
    results = [None] * 8

    def one(i):
        results[i] = post(cluster, "/v1/chat/completions", chat(SYSTEMS[i % 4], f"question {i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert {r.headers["x-slimlm-replica"] for r in results} == {"0", "1"}
    assert all(r.json()["object"] == "chat.completion" for r in results)
    assert post(cluster, "/v1/chat/completions", chat("s", "u"), key=None).status_code == 401
    bad = post(cluster, "/v1/completions", {"model": "other", "prompt": "hi"})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    # greedy, so the stream must spell the non-streamed text (a random tiny model may emit partial
    # UTF-8 that the stream holds back: the number of chunks is not fixed, their text is)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    with httpx.stream("POST", cluster + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={**body, "stream": True}) as r:
        events = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    chunks = [json.loads(x[len("data: "):]) for x in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = post(cluster, "/v1/completions", body).json()["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    health = httpx.get(cluster + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["replicas"] == ["ok", "ok"]


def test_shared_prefixes_land_on_one_replica(cluster):
    before = httpx.get(cluster + "/metrics", timeout=30).text
    where: dict[int, set[str]] = {}
    for i in range(12):
        g = i % 4
        r = post(cluster, "/v1/chat/completions", chat(SYSTEMS[g], f"follow-up {i}"))
        assert r.status_code == 200
        where.setdefault(g, set()).add(r.headers["x-slimlm-replica"])
    assert all(len(s) == 1 for s in where.values()), where
    after = httpx.get(cluster + "/metrics", timeout=30).text
    hits = {i: metric(after, "slimlm_prefix_cache_hit_tokens_total", i)
            - metric(before, "slimlm_prefix_cache_hit_tokens_total", i) for i in (0, 1)}
    routed = {i: metric(after, "slimlm_router_requests_total", i)
              - metric(before, "slimlm_router_requests_total", i) for i in (0, 1)}
    assert sum(routed.values()) == 12
    # each group's 2nd and 3rd request reuse its system prompt's blocks on the replica that holds them
    assert sum(hits.values()) >= 8 * 48, hits
    for i in (0, 1):
        assert (hits[i] > 0) == (str(i) in set().union(*where.values()))


def _pid(index: int) -> int:
    from ray import serve

    return serve.get_deployment_handle(f"slimlm-replica-{index}", app_name="slimlm").ping.remote().result()


def _first_event(lines) -> str:
    for x in lines:
        if x.startswith("data: "):
            return x
    raise AssertionError("the stream ended without an event")


def _counter(text: str, name: str) -> float:
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + " "))


LONG = 1200  # tokens: a few seconds of the tiny model, so the requests are still running at the kill


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(cluster):
    shared = "Once upon a time, in a land of paged attention, "  # 23 tokens: a full block, routed by prefix

    def long(prompt, stream=True):
        return {"model": "tiny", "prompt": prompt, "max_tokens": LONG, "ignore_eos": True, "stream": stream,
                "temperature": 0}

    def stream(prompt):
        return httpx.stream("POST", cluster + "/v1/completions", timeout=120,
                            headers={"Authorization": f"Bearer {KEY}"}, json=long(prompt))

    retries_before = _counter(httpx.get(cluster + "/metrics", timeout=30).text, "slimlm_router_retries_total")
    with stream(shared) as a, stream("def add(a, b):") as b:
        victim, survivor = int(a.headers["x-slimlm-replica"]), int(b.headers["x-slimlm-replica"])
        assert victim != survivor  # the second goes to the least-loaded replica
        lines_a, lines_b = a.iter_lines(), b.iter_lines()
        events_a, events_b = [_first_event(lines_a)], [_first_event(lines_b)]
        # a non-streamed request on the victim (it shares a's prefix): nothing is sent before it finishes,
        # so when its replica dies it is retried on the other one
        quiet: dict = {}
        body = long(shared + "and", stream=False)
        t = threading.Thread(target=lambda: quiet.update(r=post(cluster, "/v1/completions", body)))
        t.start()
        deadline = time.time() + 60
        while metric(httpx.get(cluster + "/metrics", timeout=30).text, "slimlm_requests_running", victim) < 2:
            assert time.time() < deadline, "the non-streamed request never reached the victim"
            time.sleep(0.2)
        os.kill(_pid(victim), signal.SIGKILL)
        events_a += [x for x in lines_a if x.startswith("data: ")]
        events_b += [x for x in lines_b if x.startswith("data: ")]
        t.join(120)
    assert events_a[-1] == "data: [DONE]"
    assert json.loads(events_a[-2][6:])["error"]["code"] == "replica_failed", events_a[-3:]
    assert events_b[-1] == "data: [DONE]" and all("error" not in json.loads(x[6:]) for x in events_b[:-1])
    assert json.loads(events_b[-2][6:])["choices"][0]["finish_reason"] == "length"
    r = quiet["r"]
    assert r.status_code == 200 and r.headers["x-slimlm-replica"] == str(survivor), r.text
    assert r.json()["usage"]["completion_tokens"] == LONG
    retries = _counter(httpx.get(cluster + "/metrics", timeout=30).text, "slimlm_router_retries_total")
    assert retries - retries_before == 1
    other = post(cluster, "/v1/completions", {"model": "tiny", "prompt": "while one replica is down", "max_tokens": 2})
    assert other.status_code == 200
    deadline = time.time() + 240
    while httpx.get(cluster + "/health", timeout=30).json()["replicas"] != ["ok", "ok"]:
        assert time.time() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    assert _pid(victim) > 0
    seen = set()
    for i in range(8):  # new prefixes: the router spreads them over both replicas again
        r = post(cluster, "/v1/completions", {"model": "tiny", "prompt": f"{i} " * 40, "max_tokens": 2})
        assert r.status_code == 200
        seen.add(r.headers["x-slimlm-replica"])
    assert seen == {"0", "1"}


def test_bad_replica_flags_are_one_line_errors(capsys):
    for argv in (["--replicas", "0"], ["--replicas", "2", "--ray-address", "127.0.0.1:1"],
                 ["--replicas", "2", "--max-imbalance", "-1"], ["--replicas", "2", "--model", "no/such/dir"]):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
