"""Two torchrun agents as two "nodes" on localhost (``--nnodes 2``, c10d rendezvous, gloo): the
losses equal one process on the same global batch, and a job killed on both nodes resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # several processes: `make test-all` (pyproject.toml)

from slimlm.train.metrics import read_metrics
from slimlm.train.trainer import Trainer
from tests.serve.test_server import free_port
from tests.train.helpers import tiny_args, tiny_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
EXTRA = ("--train.steps", str(STEPS), "--checkpoint.every", "5")


def start_nodes(cfg: Path, out: Path, data: Path, job: str) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on localhost."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    nodes = []
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", job,
               "--max_restarts", "0", "-m", "slimlm.cli", "train", str(cfg), *tiny_args(data, out, *EXTRA)]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return nodes


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill(nodes: list[subprocess.Popen]) -> None:
    """Both nodes lost at once: every worker and agent SIGKILLed."""
    pids = [c for p in nodes for c in descendants(p.pid)] + [p.pid for p in nodes]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in nodes:
        p.wait()


def finish(nodes: list[subprocess.Popen], timeout: float = 240) -> None:
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in nodes]
    except subprocess.TimeoutExpired:
        kill(nodes)
        pytest.fail("a torchrun node timed out")
    for p, err in zip(nodes, errs):
        assert p.returncode == 0, err[-3000:]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_two_nodes_match_one_process_and_resume_after_a_kill(prepared, tmp_path):
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")  # every setting comes from the overrides
    single = Trainer(tiny_config(prepared, tmp_path / "one", *EXTRA, "--data.micro_batch", "4"))
    single.fit()
    single.close()
    want = losses(tmp_path / "one")
    assert sorted(want) == list(range(1, STEPS + 1))

    whole = tmp_path / "two-nodes"
    finish(start_nodes(cfg, whole, prepared, "whole"))
    got = losses(whole)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():  # micro_batch 2 on each of 2 nodes = one process with 4 rows
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step

    cut = tmp_path / "killed"
    nodes = start_nodes(cfg, cut, prepared, "cut")
    deadline = time.time() + 240
    while not ((cut / "metrics.jsonl").exists() and 6 in losses(cut)):  # past the checkpoint at update 5
        assert time.time() < deadline and all(p.poll() is None for p in nodes), "the job ended before the kill"
        time.sleep(0.05)
    kill(nodes)
    time.sleep(0.5)
    done = losses(cut)
    assert STEPS not in done, "the job finished before the kill; the test proves nothing"
    checkpoints = sorted(p.name for p in (cut / "checkpoints").iterdir())
    time.sleep(1.0)
    assert losses(cut) == done, "a worker outlived the kill"
    finish(start_nodes(cfg, cut, prepared, "cut-resumed"))
    resumed = losses(cut)
    for step, loss in want.items():  # updates after the last checkpoint were redone from the checkpoint, to the same losses
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert (cut / "checkpoints" / f"step-{STEPS:08d}").is_dir() and checkpoints[-1] != f"step-{STEPS:08d}"
