"""The quality-task extension point: a named, seeded evaluation scored through a :class:`ScoringLM`.

A task is a dataclass whose fields are its settings (recorded in the result JSON). ``run``
returns plain results; ``table`` and ``plot`` render a saved report, so ``slimlm report`` can
draw results long after the run. ``headline`` names the figures the efficiency frontier compares.

How to add a task:
1. New file in ``src/slimlm/eval/``: a dataclass subclassing :class:`Task`, registered with
   ``@TASKS.register("name")``; import it in ``eval/registry.py``.
2. Score only through ``lm.prompt_logprobs`` / ``lm.greedy`` (so engine options affect quality),
   with data that installs offline (``eval/data.py``); seed every random choice.
3. Add a tiny-model test in ``tests/eval/`` that builds its own data.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from slimlm.eval.lm import ScoringLM
from slimlm.registry import Registry


@dataclass
class Task(ABC):
    name: ClassVar[str]
    help: ClassVar[str] = ""
    cli: ClassVar[dict[str, str]] = {}
    """field -> command-line flag (fields not listed are not on the command line)."""

    seed: int = 0
    """Seeds every random choice (sampled examples, passkeys), so results are reproducible."""

    @classmethod
    def add_args(cls, g: argparse._ArgumentGroup) -> None:
        """This task's flags; defaults stay None so the dataclass default applies."""

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Task:
        kw = {f: getattr(a, flag.lstrip("-").replace("-", "_")) for f, flag in cls.cli.items()}
        return cls(seed=a.seed, **{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_dict(cls, kw: dict[str, Any]) -> Task:
        names = {f.name for f in fields(cls)}
        unknown = set(kw) - names
        if unknown:
            from slimlm.errors import SlimLMError

            raise SlimLMError(f"task '{cls.name}' has no setting {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(names))}")
        return cls(**kw)

    @abstractmethod
    def run(self, lm: ScoringLM, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Score ``lm`` and return the results (JSON-able, deterministic)."""

    @abstractmethod
    def table(self, report: dict[str, Any]) -> str:
        """Markdown of a saved report (``report["results"]``, ``report["settings"]``)."""

    @abstractmethod
    def headline(self, results: dict[str, Any]) -> list[tuple[str, float, bool]]:
        """[(metric, value, higher is better)] for comparisons between configurations."""

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        return []


TASKS: Registry[Task] = Registry("task")


def float_list(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        from slimlm.errors import SlimLMError

        raise SlimLMError(f"expected comma-separated numbers, got {text!r}") from None
