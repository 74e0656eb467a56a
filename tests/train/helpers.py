"""Configs for tiny training runs on the test data, and the kill-and-resume check."""

from __future__ import annotations

from pathlib import Path

from slimlm.train.config import TrainConfig, load_config


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--out_dir", str(out), "--data.train", str(data), "--data.seq_len", "64", "--data.micro_batch", "2",
        "--train.steps", "6", "--train.threads", "1", "--log.every", "1", "--log.progress", "false",
        "--log.tensorboard", "false", "--log.eval_batches", "1", "--schedule.name", "wsd", "--schedule.lr", "3e-3",
        "--schedule.warmup_steps", "2", "--checkpoint.every", "3", *extra,
    ]


def tiny_config(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(None, tiny_args(data, out, *extra))


def losses_after_kill_and_resume(data: Path, out: Path, *extra: str) -> dict[str, dict[int, float]]:
    """Train a tiny run whole ("ref") and once killed after update 4 (checkpoint at 3) then
    resumed ("cut"); returns each run's {step: loss}: step-exact resume gives equal dicts."""
    from slimlm.train.metrics import read_metrics
    from slimlm.train.trainer import Trainer

    def run(path: Path, max_updates: int | None = None) -> None:
        t = Trainer(tiny_config(data, path, *extra))
        try:
            t.fit(max_updates)
        finally:
            t.close()

    run(out / "ref")
    run(out / "cut", max_updates=4)
    run(out / "cut")
    return {p: {r["step"]: r["loss"] for r in read_metrics(out / p / "metrics.jsonl") if "loss" in r}
            for p in ("ref", "cut")}
