"""Compression runs are training runs with one extra section: read both from one TOML/JSON file.

    [distill] or [finetune]   this package's section (its own typed dataclass)
    everything else           the ordinary ``slimlm train`` config (``slimlm.train.config``)

``--section.key value`` overrides apply to either part; unknown keys list the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from slimlm.train.config import TrainConfig, apply_overrides, build, parse_overrides, read_file

T = TypeVar("T")
ALIASES = {"time_budget": "train.time_budget_minutes", "steps": "train.steps", "out": "out_dir",
           "method": "finetune.method"}


def load_run(path: str | Path | None, overrides: list[str], section: str, cls: type[T]) -> tuple[TrainConfig, T]:
    raw: dict[str, Any] = read_file(Path(path)) if path is not None else {}
    apply_overrides(raw, [(ALIASES.get(k, k), v) for k, v in parse_overrides(overrides)])
    own = raw.pop(section, {})
    return build(TrainConfig, raw, ""), build(cls, own, section)
