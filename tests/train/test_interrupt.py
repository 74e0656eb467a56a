"""Interruptions lose nothing: SIGINT/SIGTERM checkpoint the current update and print the resume
command; finished runs say so; run folders load by their newest checkpoint; short runs warn."""

from __future__ import annotations

import os
import signal

import pytest

import slimlm
from slimlm.cli import main
from slimlm.errors import SlimLMError
from slimlm.train import checkpoint as ck
from slimlm.train.metrics import read_metrics
from slimlm.train.trainer import Trainer
from tests.train.helpers import tiny_args, tiny_config


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def signal_at(monkeypatch, step: int, sig: int) -> None:
    """Deliver ``sig`` to this process while update ``step`` (1-based) runs."""
    update = Trainer.update

    def update_then_signal(self):
        r = update(self)
        if self.step == step:
            os.kill(os.getpid(), sig)
        return r

    monkeypatch.setattr(Trainer, "update", update_then_signal)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_the_current_update_and_prints_the_resume_command(prepared, tmp_path, capsys,
                                                                            monkeypatch, sig, code):
    ref = tmp_path / "ref"
    t = Trainer(tiny_config(prepared, ref, "--checkpoint.every", "0"))
    t.fit()
    t.close()
    (tmp_path / "run.toml").write_text("")
    args = ["train", str(tmp_path / "run.toml"), *tiny_args(prepared, tmp_path / "run", "--checkpoint.every", "0")]
    signal_at(monkeypatch, 4, sig)
    previous = signal.getsignal(sig)
    assert main(args) == code
    assert signal.getsignal(sig) is previous  # handlers put back
    err = capsys.readouterr().err
    path = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert f"interrupted ({signal.Signals(sig).name}) at update 4 of 6; checkpoint {path}; resume with: slimlm train" in err
    assert ck.verify(path) is None and max(losses(tmp_path / "run")) == 4
    monkeypatch.undo()
    resume = err.split("resume with: ")[1].split()  # the printed command, run as printed
    assert resume[:2] == ["slimlm", "train"]
    assert main(resume[1:]) == 0
    assert losses(tmp_path / "run") == losses(ref)  # step-exact
    assert f"final checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-00000006'}" in capsys.readouterr().err


def test_rerunning_a_finished_run_says_so(prepared, tmp_path, capsys):
    (tmp_path / "run.toml").write_text("")
    args = ["train", str(tmp_path / "run.toml"), *tiny_args(prepared, tmp_path / "run")]
    assert main(args) == 0
    assert main(args) == 0
    err = capsys.readouterr().err
    final = tmp_path / "run" / "checkpoints" / "step-00000006"
    assert f"already finished: 6 of 6 updates done, final checkpoint {final}; nothing to train" in err
    lm = slimlm.load(tmp_path / "run")  # a run folder loads by its newest checkpoint
    assert lm.path == final and lm.tokenizer is not None


def test_a_run_folder_without_checkpoints_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SlimLMError, match="has no complete checkpoint yet"):
        slimlm.load(tmp_path)


@pytest.mark.parametrize("extra,message", [
    (("--train.steps", "2", "--schedule.warmup_steps", "2"), "the whole run is warm-up"),
    (("--schedule.warmup_steps", "5", "--schedule.decay_fraction", "0.5"), "the decay starts at update 3, inside the warm-up"),
], ids=["all-warmup", "decay-in-warmup"])
def test_a_run_shorter_than_its_warmup_warns(prepared, tmp_path, capsys, extra, message):
    Trainer(tiny_config(prepared, tmp_path, *extra)).close()
    assert message in capsys.readouterr().err


def test_resume_with_another_technique_is_refused_unless_allowed(prepared, tmp_path, capsys):
    (tmp_path / "run.toml").write_text("")
    args = ["train", str(tmp_path / "run.toml"), *tiny_args(prepared, tmp_path / "run", "--train.steps", "3")]
    assert main(args) == 0
    changed = args[:2] + tiny_args(prepared, tmp_path / "run", "--train.steps", "4", "--optim.name", "lamb")
    assert main(changed) == 2
    assert "other technique settings (optim.name: 'adamw' -> 'lamb')" in capsys.readouterr().err
    assert main([*changed, "--allow-config-change"]) == 0
