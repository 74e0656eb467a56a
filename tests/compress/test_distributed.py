"""Distillation and fine-tuning under DDP: 2 CPU processes over gloo take the same updates (same
loss, same weights) as one process with both ranks' rows in its batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # several processes: `make test-all` (pyproject.toml)
import torch
from safetensors.torch import load_file

from slimlm.cli import main
from slimlm.train.metrics import read_metrics
from tests.conftest import make_hf_model
from tests.train.helpers import tiny_args

from tests.train.conftest import one_thread, prepared, tokenizer_dir  # noqa: F401,E402  (shared fixtures)

ROOT = Path(__file__).resolve().parents[2]


def torchrun(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "slimlm",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"torchrun timed out; stderr: {p.communicate()[1][-3000:]}")
    assert p.returncode == 0, err[-3000:]
    return err


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("ddp-models")
    make_hf_model(root / "teacher", "llama", num_hidden_layers=3)
    make_hf_model(root / "student", "llama", seed=1, hidden_size=48, intermediate_size=96)  # another width
    return root


CONFIGS = {
    # KL + LM + hidden-state loss through the learned projection (its weights sync like the student's)
    "distill": lambda m: (f'[model]\ninit_from = "{m / "student"}"\n[distill]\nteacher = "{m / "teacher"}"\n'
                          'temperature = 2.0\nlm_weight = 0.5\nhidden_weight = 0.5\n'),
    # the same under FSDP2 (sharded student; the projection is sharded with the root module)
    "distill-fsdp2": lambda m: CONFIGS["distill"](m) + '[dist]\nstrategy = "fsdp2"\n',
    "finetune": lambda m: f'[model]\ninit_from = "{m / "teacher"}"\n[finetune]\nmethod = "lora"\nrank = 2\n',
}


@pytest.mark.parametrize("mode", ["distill", "distill-fsdp2", "finetune"])
def test_two_processes_match_one(prepared, models, tmp_path, mode):
    config = tmp_path / f"{mode}.toml"
    config.write_text(CONFIGS[mode](models))
    mode = mode.split("-")[0]
    extra = ("--train.steps", "4", "--checkpoint.every", "4", "--optim.weight_decay", "0.0")
    err = torchrun([mode, str(config), *tiny_args(prepared, tmp_path / "two", *extra)])
    assert err.count("2 process(es) on cpu") == 1
    assert main([mode, str(config), *tiny_args(prepared, tmp_path / "one", *extra, "--data.micro_batch", "4")]) == 0

    def losses(p):
        return {r["step"]: r["loss"] for r in read_metrics(p / "metrics.jsonl") if "loss" in r}

    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert two.keys() == one.keys() == {1, 2, 3, 4}
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-4), s
    a = load_file(tmp_path / "two" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    if mode == "distill":  # the exported student (without its projection) is the same too
        a, b = (load_file(p / "final" / "model.safetensors") for p in (tmp_path / "two", tmp_path / "one"))
        assert a.keys() == b.keys() and not any(k.startswith("distill_proj") for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
