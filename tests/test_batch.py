"""`slimlm batch`: OpenAI batch files through the server's app, restartable, per-row errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimlm import LLM, SamplingParams
from slimlm.cli import main

PROMPTS = ["The quick brown fox", "def add(a, b):", "Small language models are", "Once upon a time",
           "Paged attention stores", "12345 and then"]
MESSAGES = [[{"role": "user", "content": "Name three colors."}], [{"role": "system", "content": "Be short."},
                                                                    {"role": "user", "content": "def add"}]]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def requests(max_tokens: int = 12) -> list[dict]:
    rows = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "gpt-4o-mini", "prompt": p, "max_tokens": max_tokens, "temperature": 0}}
            for i, p in enumerate(PROMPTS)]
    rows += [{"custom_id": f"c{i}", "body": {"messages": m, "max_tokens": max_tokens, "temperature": 0}}
             for i, m in enumerate(MESSAGES)]  # no url: inferred from the body
    return rows


def records(path: Path) -> dict[str, dict]:
    out = {}
    for raw in path.read_text().splitlines():
        r = json.loads(raw)
        assert r["custom_id"] not in out, f"duplicate row {r['custom_id']}"
        out[r["custom_id"]] = r
    return out


def text_of(r: dict) -> str:
    choice = r["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir))
    sp = SamplingParams(temperature=0, max_tokens=12)
    gen = [o.outputs[0] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    chat = [o.outputs[0] for o in llm.chat(MESSAGES, sp, use_tqdm=False)]
    return {**{f"p{i}": o for i, o in enumerate(gen)}, **{f"c{i}": o for i, o in enumerate(chat)}}


def check_equal(out: dict[str, dict], reference) -> None:
    assert set(out) == set(reference)
    for cid, o in reference.items():
        r = out[cid]
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        assert text_of(r) == o.text, cid
        assert r["response"]["body"]["usage"]["completion_tokens"] == len(o.token_ids)


def test_batch_equals_llm_generate(tmp_path, tiny_llama_dir, reference):
    inp = write_lines(tmp_path / "in.jsonl", requests())
    assert main(["batch", str(inp), str(tmp_path / "out.jsonl"), "--model", str(tiny_llama_dir),
                 "--served-model-name", "tiny", "--no-progress", "--concurrency", "3"]) == 0
    out = records(tmp_path / "out.jsonl")
    check_equal(out, reference)
    assert {r["response"]["body"]["model"] for r in out.values()} == {"tiny"}
    assert out["c1"]["response"]["body"]["object"] == "chat.completion"
    assert out["p0"]["id"] == "batch_req_1" and out["p0"]["line"] == 1


def test_bad_lines_get_error_records_and_the_rest_runs(tmp_path, tiny_llama_dir, reference):
    good = requests()
    lines = [good[0], "{not json", {"custom_id": "nobody"}, {"custom_id": "empty", "body": {"max_tokens": 3}},
             "", {"custom_id": "zero", "body": {"prompt": "hi", "max_tokens": 0}},
             {"custom_id": "url", "url": "/v1/embeddings", "body": {"input": "x"}},
             {"custom_id": "stream", "body": {"prompt": "hi", "stream": True}}, good[1]]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    assert main(["batch", str(inp), str(tmp_path / "out.jsonl"), "--model", str(tiny_llama_dir),
                 "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r for r in rows}
    assert sorted(by_line) == [1, 2, 3, 4, 6, 7, 8, 9]  # the blank line 5 is not a request
    assert by_line[2]["error"]["code"] == "invalid_json" and by_line[2]["error"]["message"].startswith("line 2:")
    assert by_line[3]["error"]["code"] == "invalid_line"
    assert "neither 'messages' nor 'prompt'" in by_line[4]["error"]["message"]
    assert by_line[6]["response"]["status_code"] == 400  # the server's own answer to max_tokens 0
    assert by_line[6]["response"]["body"]["error"]["param"] == "max_tokens"
    assert by_line[7]["error"]["code"] == "invalid_url" and by_line[8]["error"]["code"] == "invalid_body"
    assert text_of(by_line[1]) == reference["p0"].text and text_of(by_line[9]) == reference["p1"].text


def test_bad_invocations_are_one_line_errors(tmp_path, tiny_llama_dir, capsys):
    inp = write_lines(tmp_path / "in.jsonl", requests()[:1])
    for argv in ([str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")],
                 [str(inp), str(tmp_path / "o.jsonl"), "--concurrency", "0"],
                 [str(inp), str(inp)],
                 [str(inp), str(tmp_path / "o.jsonl"), "--ray-address", "127.0.0.1:1"]):
        assert main(["batch", *argv, "--model", str(tiny_llama_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    (tmp_path / "o.jsonl").write_text("this is not a batch output\n")
    assert main(["batch", str(inp), str(tmp_path / "o.jsonl"), "--model", str(tiny_llama_dir)]) == 2


def test_killed_job_resumes_without_duplicates(tmp_path, tiny_llama_dir, reference):
    rows = requests(max_tokens=12) * 4
    for i, r in enumerate(rows):
        r = rows[i] = json.loads(json.dumps(r))
        r["custom_id"] = f"{r['custom_id']}#{i}"
    inp = write_lines(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "slimlm.cli", "batch", str(inp), str(out), "--model", str(tiny_llama_dir),
           "--concurrency", "1", "--no-progress", "--threads", "1"]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out.exists() and len(out.read_text().splitlines()) >= 4):
        assert p.poll() is None and time.time() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = len(out.read_text().splitlines())
    assert first < len(rows), "the job finished before the kill; the test proves nothing"
    with open(out, "a") as f:
        f.write('{"id": "batch_req_99", "custom_id": "torn')  # a record cut mid-write
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{first} already done" in r.stderr
    got = records(out)  # asserts no duplicates
    assert len(got) == len(rows)
    for cid, rec in got.items():
        assert text_of(rec) == reference[cid.split("#")[0]].text
