"""`slimlm batch --ray`: the same records as the local job, from engines on Ray Data workers."""

from __future__ import annotations

import signal

import pytest

pytestmark = pytest.mark.multiprocess  # several processes: `make test-all` (pyproject.toml)

ray = pytest.importorskip("ray")

from slimlm.cli import main  # noqa: E402
from tests.test_batch import check_equal, records, reference, requests, write_lines  # noqa: E402,F401


@pytest.fixture(scope="module")
def local_ray():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
    for sig, handler in handlers.items():  # ray.init turns SIGTERM into SystemExit in this process
        signal.signal(sig, handler)


def test_ray_batch_equals_llm_generate_and_resumes(tmp_path, tiny_llama_dir, reference, local_ray):  # noqa: F811
    rows = requests()
    inp = write_lines(tmp_path / "in.jsonl", rows[:3] + ["{broken"] + rows[3:])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "batch_req_1", "custom_id": "p0", "line": 1, "response": null, "error": null}\n')
    argv = ["batch", str(inp), str(out), "--model", str(tiny_llama_dir), "--ray", "--workers", "2",
            "--rows-per-task", "2", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == len(rows) + 1  # line 1 was already done: not redone
    got = records(out)
    assert got.pop(None)["error"]["message"].startswith("line 4:")
    assert got.pop("p0")["response"] is None
    check_equal(got, {k: v for k, v in reference.items() if k != "p0"})
    assert main(argv) == 0 and out.read_text().splitlines() == lines  # everything done: nothing added


def test_unreachable_ray_address_is_one_line(tmp_path, tiny_llama_dir, capsys):
    inp = write_lines(tmp_path / "in.jsonl", requests()[:1])
    assert main(["batch", str(inp), str(tmp_path / "o.jsonl"), "--model", str(tiny_llama_dir), "--ray",
                 "--ray-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in err[0]
    assert not (tmp_path / "o.jsonl").exists()
