"""Data parallel with torchrun: 2 CPU processes over gloo (DDP and FSDP2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # several processes: `make test-all` (pyproject.toml)
import torch
from safetensors.torch import load_file

from slimlm.train.trainer import Trainer
from tests.train.helpers import tiny_args, tiny_config

ROOT = Path(__file__).resolve().parents[2]


GALORE = ("--optim.name", "galore", "--optim.galore.rank", "4", "--optim.galore.update_proj_gap", "2")
MOE = ("--model.moe.num_experts", "4", "--model.moe.intermediate_size", "32", "--model.moe.balance", "global")


@pytest.mark.parametrize("strategy,technique", [("ddp", ()), ("fsdp2", ()), ("ddp", GALORE), ("fsdp2", GALORE),
                                                ("ddp", MOE)],
                         ids=["ddp", "fsdp2", "ddp-galore", "fsdp2-galore", "ddp-moe-global-balance"])
def test_two_process_run_matches_single_process(prepared, tmp_path, strategy, technique):
    out = tmp_path / "dist"
    out.mkdir()
    extra = ["--train.steps", "4", "--checkpoint.every", "0", "--dist.strategy", strategy, *technique]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.train.dist_worker", str(out), *tiny_args(prepared, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers
        pytest.fail(f"torchrun timed out; stderr: {p.communicate()[1][-3000:]}")
    assert p.returncode == 0, err[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks == {"world": 2, "max_rank_diff": 0.0}  # every rank holds the same parameters
    assert err.count("2 process(es) on cpu") == 1  # only rank 0 reports
    # one process with both ranks' rows in its batch takes the same updates
    single = Trainer(tiny_config(prepared, tmp_path / "one", *extra, "--data.micro_batch", "4"))
    single.fit()
    single.close()
    got = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    for k, v in single.model.state_dict().items():
        if k in got:
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert len(list((out / "checkpoints").iterdir())) == 1  # written once, by rank 0
