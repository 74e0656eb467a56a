"""The trainer on a tiny random model: resume, checkpoints, accumulation, guards, bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from slimlm.cli import main
from slimlm.train import checkpoint as ck
from slimlm.train.metrics import read_metrics
from slimlm.train.trainer import Trainer
from tests.train.helpers import tiny_args, tiny_config


def run(cfg, max_updates=None) -> Trainer:
    t = Trainer(cfg)
    try:
        t.fit(max_updates)
    finally:
        t.close()
    return t


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """An uninterrupted 6-update run, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("ref")
    run(tiny_config(prepared, out, "--log.eval_every", "3"))
    return out


def test_kill_and_resume_equals_an_uninterrupted_run(prepared, reference, tmp_path, capsys):
    run(tiny_config(prepared, tmp_path), max_updates=4)  # checkpoint at 3, then "killed" after update 4
    assert [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003"]
    assert max(losses(tmp_path)) == 4
    t = run(tiny_config(prepared, tmp_path))
    assert "resumed from" in capsys.readouterr().err and t.step == 6
    assert losses(tmp_path) == losses(reference)  # step for step, bit for bit
    a = load_file(tmp_path / "checkpoints/step-00000006/model.safetensors")
    b = load_file(reference / "checkpoints/step-00000006/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_corrupt_newest_checkpoint_falls_back_to_the_last_good_one(prepared, reference, tmp_path, capsys):
    root = tmp_path / "checkpoints"
    run(tiny_config(prepared, tmp_path, "--checkpoint.keep_last", "1"), max_updates=3)
    shutil.copytree(root / "step-00000003", root / "step-00000006")  # a newer one, then damaged
    w = root / "step-00000006" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    ck.prune(root, keep_last=1)
    assert (root / "step-00000003").is_dir()  # the corrupt newest one did not push out the good one
    t = run(tiny_config(prepared, tmp_path, "--checkpoint.keep_last", "1"))
    err = capsys.readouterr().err
    assert "step-00000006 is corrupt" in err and "falling back to the last good checkpoint step-00000003" in err
    assert losses(tmp_path) == losses(reference) and t.step == 6
    assert ck.verify(root / "step-00000006") is None and not (root / "step-00000003").exists()  # rewritten, pruned


def test_checkpoint_loads_in_slimlm_and_transformers(reference):
    import transformers

    import slimlm

    path = reference / "checkpoints" / "step-00000006"
    lm = slimlm.load(path)
    assert lm.tokenizer is not None and lm.tokenizer.encode("quick brown fox")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([lm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, lm.model(ids), atol=1e-5, rtol=1e-4)
    state = ck.load_checkpoint(path)
    assert state.trainer["step"] == 6 and state.trainer["data"]["rows"] == 12 and "state" in state.optimizer
    recs = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in recs if "val_loss/tokens" in r] == [3, 6]


def test_gradient_accumulation_equals_one_big_batch(prepared, tmp_path):
    big = run(tiny_config(prepared, tmp_path / "a", "--data.micro_batch", "4", "--train.steps", "3"))
    acc = run(tiny_config(prepared, tmp_path / "b", "--data.micro_batch", "2", "--train.grad_accum", "2",
                          "--train.steps", "3"))
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-5 for k in la)


def test_non_finite_loss_skips_the_update_and_says_so(prepared, tmp_path, capsys):
    t = Trainer(tiny_config(prepared, tmp_path))
    t.update()
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 1 else out

    h = t.model.model.layers[0].register_forward_hook(poison)
    before = [p.detach().clone() for p in t.model.parameters()]
    r = t.update()
    h.remove()
    assert r.skipped and t.skipped == 1 and t.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert "update 1: non-finite loss (nan); update skipped" in capsys.readouterr().err
    assert not t.update().skipped and not torch.equal(before[0], t.model.model.embed_tokens.weight)
    t.close()


def test_time_budget_sets_the_update_count(prepared, tmp_path, capsys):
    t = run(tiny_config(prepared, tmp_path, "--train.time_budget_minutes", "0.004", "--train.budget_probe_steps", "3",
                        "--train.steps", "100000", "--checkpoint.every", "0"))
    err = capsys.readouterr().err
    assert "time budget 0.004 min at" in err
    assert 3 <= t.step == t.horizon.total_steps < 100000


@pytest.mark.parametrize("extra", [
    ("--optim.name", "lamb", "--schedule.lr", "2e-2"),
    ("--data.packing", "varlen", "--data.seq_len", "32", "--data.min_len", "8"),
    ("--data.packing", "concat", "--schedule.name", "cosine"),
    ("--train.precision", "bf16", "--schedule.name", "power", "--schedule.a", "1.0"),
], ids=["lamb", "varlen", "concat-cosine", "bf16-power"])
def test_variants_learn(prepared, tmp_path, extra):
    run(tiny_config(prepared, tmp_path, "--train.steps", "12", "--checkpoint.every", "0", *extra))
    loss = losses(tmp_path)
    assert loss[12] < loss[1] - 0.3, loss


def test_branch_a_decay_from_a_stable_checkpoint(prepared, reference, tmp_path):
    from slimlm.train.schedules import WSD, Horizon

    src = reference / "checkpoints" / "step-00000003"
    t = run(tiny_config(prepared, tmp_path, "--checkpoint.resume_from", str(src), "--schedule.decay_start", "3",
                        "--schedule.decay_shape", "linear", "--train.steps", "5"))
    assert t.step == 5
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r}
    w, h = WSD(lr=3e-3, warmup_steps=2, decay_start=3, decay_shape="linear"), Horizon(5)
    assert lrs == {4: w(3, h), 5: w(4, h)} and lrs[4] == pytest.approx(1.5e-3) and lrs[5] == 0.0
    assert losses(tmp_path)[4] == losses(reference)[4]  # update 4's loss is taken before its lr acts


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(prepared, tmp_path):
    """A real kill (SIGKILL, possibly mid-checkpoint) of `slimlm train`, then resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    extra = ("--train.steps", "40", "--checkpoint.every", "2", "--checkpoint.keep_last", "2")
    ref = tmp_path / "ref"
    run(tiny_config(prepared, ref, *extra))
    out = tmp_path / "killed"
    (tmp_path / "empty.toml").write_text("")
    cmd = [sys.executable, "-m", "slimlm.cli", "train", str(tmp_path / "empty.toml"), *tiny_args(prepared, out, *extra)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (out / "checkpoints" / "step-00000004").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, f"`slimlm train` ended (exit {p.returncode}) before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = max(losses(out))
    assert killed_at < 40, "the run finished before it could be killed"
    t = run(tiny_config(prepared, out, *extra))
    assert t.step == 40 and losses(out) == losses(ref)
