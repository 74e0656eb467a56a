"""`--ray-address`: joining a cluster started by `ray start --head` (token auth on, as Ray >= 2.59 does by default).

The head runs with its own HOME holding a token in ``~/.ray/auth_token`` (what any earlier local
``ray.init()`` leaves behind), so ``ray start --head`` turns token auth on by itself; slimlm, run as
a separate process with the same HOME and no ``RAY_AUTH_MODE``, must find the token and join. Without
the token the join fails with Ray's ``InvalidAuthToken`` (the bug this covers), which slimlm reports
in one line. One head for the module (``ray start --block``, stopped with SIGTERM, the process group
killed after), about 30 s in all on 2 cores.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.multiprocess  # several processes: `make test-all` (pyproject.toml)

ray = pytest.importorskip("ray")

from tests.serve.test_server import free_port  # noqa: E402
from tests.test_batch import check_equal, records, reference, requests, write_lines  # noqa: E402,F401

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(home: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""),
               **extra)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    port = free_port()
    log = home / "head.log"
    ray_cli = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", f"--ray-client-server-port={free_port()}"],
            env=_env(home), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        assert "Token authentication is enabled" in log.read_text()  # the head turned token auth on by itself
        yield home, f"127.0.0.1:{port}"
    finally:
        proc.terminate()  # --block: `ray start` stops what it started (it may drain up to 30 s first)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that process group still there
        except ProcessLookupError:
            pass


def slimlm(env, *argv, timeout=240):
    return subprocess.run([sys.executable, "-m", "slimlm", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_batch_joins_a_ray_start_cluster(head, tmp_path, tiny_llama_dir, reference):  # noqa: F811
    home, address = head
    inp = write_lines(tmp_path / "in.jsonl", requests())
    out = tmp_path / "out.jsonl"
    r = slimlm(_env(home), "batch", str(inp), str(out), "--model", str(tiny_llama_dir), "--ray", "--ray-address",
               address, "--workers", "1", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    check_equal(records(out), reference)


def test_serve_replicas_join_a_ray_start_cluster(head, tiny_llama_dir):
    home, address = head
    port = free_port()
    env = _env(home)
    proc = subprocess.Popen([sys.executable, "-m", "slimlm", "serve", "--model", str(tiny_llama_dir),
                             "--served-model-name", "tiny", "--replicas", "1", "--ray-address", address,
                             "--port", str(port), "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the replicas did not come up"
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-slimlm-replica"] == "0", r.text
        assert r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]


def test_a_join_without_the_token_is_one_line(head, tmp_path, tiny_llama_dir):
    home, address = head
    inp = write_lines(tmp_path / "in.jsonl", requests()[:1])
    env = _env(tmp_path, RAY_gcs_server_port_wait_time_s="2")  # else Ray retries ~20 times
    r = slimlm(env, "batch", str(inp), str(tmp_path / "o.jsonl"), "--model", str(tiny_llama_dir),
               "--ray", "--ray-address", address, "--no-progress")  # a HOME without the cluster's token
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and err and err[-1].startswith("error: ") and "RAY_AUTH_TOKEN" in err[-1], r.stderr[-2000:]
    assert not any("Traceback" in x for x in err)
    assert not (tmp_path / "o.jsonl").exists()
