"""Configs for tiny training runs on the test data."""

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
