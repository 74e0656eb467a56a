"""FSDP2 checkpoints through torch.distributed.checkpoint (sharded, no gather to rank 0): 2 gloo
processes kill-and-resume step-exactly; the shards consolidate into a loadable model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess  # several processes: `make test-all` (pyproject.toml)
import torch
from safetensors.torch import load_file

from slimlm.train.metrics import read_metrics
from tests.train.helpers import tiny_args
from tests.train.test_distributed import ROOT


def torchrun(prepared, out, *extra, max_updates=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.train.dist_worker", str(out), *tiny_args(prepared, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "MAX_UPDATES": str(max_updates or "")}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"torchrun timed out; stderr: {p.communicate()[1][-3000:]}")
    assert p.returncode == 0, err[-3000:]
    return err


def test_fsdp2_sharded_checkpoint_resumes_step_exactly(prepared, tmp_path, capsys):
    from slimlm.cli import main

    extra = ("--dist.strategy", "fsdp2", "--checkpoint.sharded", "true", "--optim.name", "galore",
             "--optim.galore.rank", "4", "--optim.galore.update_proj_gap", "2")
    torchrun(prepared, tmp_path / "ref", *extra)
    torchrun(prepared, tmp_path / "cut", *extra, max_updates=4)  # checkpoint at 3, then update 4 is lost (a kill)
    ck = tmp_path / "cut" / "checkpoints" / "step-00000003"
    shards = sorted(p.name for p in (ck / "dcp").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards  # each rank wrote its own
    assert not (ck / "model.safetensors").exists() and not (ck / "optimizer.pt").exists()  # nothing gathered
    err = torchrun(prepared, tmp_path / "cut", *extra)
    assert "resumed from" in err and "step-00000003 at update 3" in err
    losses = {p: {r["step"]: r["loss"] for r in read_metrics(tmp_path / p / "metrics.jsonl") if "loss" in r}
              for p in ("ref", "cut")}
    assert losses["ref"] == losses["cut"] and len(losses["ref"]) == 6
    # the final shards consolidate into a plain model directory with the same weights for both runs
    outs = []
    for p in ("ref", "cut"):
        assert main(["runs", "consolidate", str(tmp_path / p / "checkpoints" / "step-00000006"),
                     "--out", str(tmp_path / f"{p}-hf")]) == 0
        outs.append(load_file(tmp_path / f"{p}-hf" / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    from slimlm.model.hub import load

    assert load(str(tmp_path / "ref-hf")).model.cfg.num_layers == 2
