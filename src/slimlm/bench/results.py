"""Result files: every run is one JSON object with its kind, name, command, time, settings,
machine and figures. ``slimlm report`` reads a folder of them."""

from __future__ import annotations

import argparse
import json
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def command_line(parser: argparse.ArgumentParser, a: argparse.Namespace, prog: str) -> str:
    """The command that reproduces ``a``: positionals, then every option not at its default."""
    parts: list[str] = []
    for act in parser._actions:  # argparse keeps no public list of actions
        if act.dest in ("help", "func") or act.dest is argparse.SUPPRESS:
            continue
        v = getattr(a, act.dest, None)
        if not act.option_strings:
            parts.append(str(v))
        elif v != act.default and v is not None:
            flag = act.option_strings[-1]
            if isinstance(act, argparse._StoreTrueAction):
                parts.append(flag)
            elif isinstance(v, list):
                for x in v:
                    parts += [flag, str(x)]
            else:
                parts += [flag, str(v)]
    return f"{prog} {shlex.join(parts)}"


def stamp(report: dict[str, Any], kind: str, name: str, command: str) -> dict[str, Any]:
    key = "scenario" if kind == "bench" else "task"
    return {"kind": kind, key: name, "command": command,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **{k: v for k, v in report.items() if k != key}}


def save(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)
    return path


def load_dir(root: str | Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """(path, report) of every readable result under ``root``, and a note per file skipped."""
    from slimlm.bench.registry import SCENARIOS
    from slimlm.errors import SlimLMError
    from slimlm.eval.registry import TASKS

    root = Path(root)
    if not root.is_dir():
        raise SlimLMError(f"results directory {root} does not exist")
    good, notes = [], []
    for f in sorted(root.rglob("*.json")):
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            notes.append(f"skipped {f}: not valid JSON ({e})")
            continue
        if not isinstance(r, dict) or r.get("kind") not in ("bench", "eval"):
            notes.append(f"skipped {f}: not a slimlm result (no kind bench/eval)")
        elif r["kind"] == "bench" and r.get("scenario") not in SCENARIOS:
            notes.append(f"skipped {f}: unknown scenario {r.get('scenario')!r}")
        elif r["kind"] == "eval" and r.get("task") not in TASKS:
            notes.append(f"skipped {f}: unknown task {r.get('task')!r}")
        else:
            good.append((f, r))
    return good, notes
