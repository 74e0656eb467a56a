"""The scenario extension point: a named benchmark that measures, summarises and renders itself.

A scenario's ``run`` returns a report dict (JSON): its settings, every repeat's figures and a
summary. ``table`` renders the report as markdown and ``plot`` draws it; ``slimlm report``
calls both on saved reports, so a scenario's output and its rendering live in one file.

How to add a scenario:
1. New file in ``src/slimlm/bench/``; subclass :class:`WorkerScenario` (systems measured in
   interleaved subprocesses) or :class:`Scenario`; register it with ``@SCENARIOS.register("name")``.
2. Import it in ``bench/registry.py``; add its options in ``add_args`` (default ``None`` when
   another scenario shares the flag, then resolve the default in ``run``).
3. Add a tiny-model test in ``tests/bench/`` (``--in-process`` keeps it fast).
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from slimlm.registry import Registry

BUSY_THRESHOLD = 0.15
STEAL_THRESHOLD = 0.05  # share of a run's CPU time stolen by the hypervisor
DRIFT_THRESHOLD = 1.15  # max / min of the speed probe over a report's runs
"""Share of the CPU used by other processes above which a run is flagged as noisy."""


@dataclass
class BenchSettings:
    """What every scenario gets from the command line."""

    model: str
    dtype: str
    threads: int
    engine: dict[str, Any]
    """EngineConfig keywords besides dtype (only those set away from their defaults)."""
    repeats: int
    skip: list[str] = field(default_factory=list)
    """Systems not to run (slimlm, transformers, llama.cpp)."""
    in_process: bool = False
    """Run workers in this process (tests, debugging): no isolation of memory or caches."""
    log: Callable[[str], None] = print

    def base_args(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "threads": self.threads, "engine": self.engine}


class Scenario(ABC):
    name: ClassVar[str]
    help: ClassVar[str] = ""

    @classmethod
    def add_args(cls, g: argparse._ArgumentGroup) -> None:
        """Options of this scenario (on the shared ``bench`` parser)."""

    @abstractmethod
    def run(self, a: argparse.Namespace, s: BenchSettings) -> dict[str, Any]:
        """Measure and return the report (settings, runs, summary, notes)."""

    @abstractmethod
    def table(self, report: dict[str, Any]) -> str:
        """Markdown table of a report."""

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        """Draw the report's figures as PNGs named after ``out`` (a path without suffix)."""
        return []


SCENARIOS: Registry[Scenario] = Registry("scenario")


def resolve(value, default):
    """A shared flag left at ``None`` takes this scenario's default."""
    return default if value is None else value


def int_list(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        from slimlm.errors import SlimLMError

        raise SlimLMError(f"expected comma-separated integers, got {text!r}") from None


class WorkerScenario(Scenario):
    """Systems measured in interleaved worker processes (:func:`slimlm.bench.runner.interleave`).

    Subclasses say which systems run with which worker arguments (:meth:`systems`) and what one
    worker measures (:meth:`worker`, run in the child process); the rest is shared."""

    columns: ClassVar[list[tuple[str, str, str]]] = []
    """(metric, column header, format spec) of the markdown table, one row per system."""
    headline: ClassVar[tuple[str, bool] | None] = None
    """(metric, higher is better) whose slimlm-vs-baseline ratio is the run's speed-up."""

    @abstractmethod
    def systems(self, a: argparse.Namespace, s: BenchSettings) -> tuple[dict[str, dict], dict, list[str]]:
        """({system label: worker args}, the report's settings, notes)."""

    @staticmethod
    @abstractmethod
    def worker(args: dict[str, Any]) -> dict[str, float]:
        """One measurement in the worker process: flat {metric: number}."""

    def derive(self, report: dict[str, Any]) -> None:
        """Add figures computed from the summary: slimlm's speed-up over each baseline, from the
        medians of this run."""
        if self.headline:
            report["speedup"] = speedups(report["summary"], *self.headline)
            report["speedup_per_repeat"] = paired_speedups(report["runs"], *self.headline)

    def run(self, a: argparse.Namespace, s: BenchSettings) -> dict[str, Any]:
        from slimlm.bench.machine import machine_info
        from slimlm.bench.runner import interleave, summarise_runs

        systems, settings, notes = self.systems(a, s)
        for n in notes:
            s.log(f"note: {n}")
        jobs = {label: ("slimlm.bench.worker", {**args, "scenario": self.name}) for label, args in systems.items()}
        results = interleave(jobs, s.repeats, s.log, in_process=s.in_process, busy_seconds=0.1 if s.in_process else 0.3)
        for label, runs in results.items():
            errors = sorted({r["error"] for r in runs if "error" in r})
            notes += [f"{label} failed: {e}" for e in errors]
        report = {"scenario": self.name, "settings": {**settings, "repeats": s.repeats}, "machine": machine_info(s.threads),
                  "runs": results, "summary": summarise_runs(results), "notes": notes}
        busy_warning(report, [r.get("cpu_busy_others", 0.0) for runs in results.values() for r in runs], s.log)
        self.derive(report)
        return report

    def table(self, report: dict[str, Any]) -> str:
        return summary_table(report["summary"], self.columns) + speedup_line(report.get("speedup"),
                                                                             report.get("speedup_per_repeat"))


def speedups(summary: dict[str, dict], metric: str, higher_is_better: bool, ref: str = "slimlm") -> dict[str, float]:
    """{baseline: how many times better ``ref`` is on ``metric``} (medians)."""
    if ref not in summary or metric not in summary[ref]:
        return {}
    mine = summary[ref][metric]["median"]
    out = {}
    for name, s in summary.items():
        if name != ref and metric in s and s[metric]["median"] and mine:
            other = s[metric]["median"]
            out[name] = mine / other if higher_is_better else other / mine
    return out


def paired_speedups(runs: dict[str, list[dict]], metric: str, higher_is_better: bool,
                    ref: str = "slimlm") -> dict[str, dict[str, float]]:
    """{baseline: summary of the ratio within each repeat} (A and B of one repeat ran back to back)."""
    from slimlm.bench.runner import summarise

    out = {}
    for name, rs in runs.items():
        if name == ref or ref not in runs:
            continue
        ratios = [(a[metric] / b[metric] if higher_is_better else b[metric] / a[metric])
                  for a, b in zip(runs[ref], rs) if a.get(metric) and b.get(metric)]
        if ratios:
            out[name] = summarise(ratios)
    return out


def speedup_line(sp: dict[str, float] | None, per_repeat: dict[str, dict] | None = None, ref: str = "slimlm") -> str:
    if not sp:
        return ""
    parts = []
    for k, v in sp.items():
        pr = (per_repeat or {}).get(k)
        extra = f" (per repeat {pr['min']:.2f}-{pr['max']:.2f})" if pr and pr["n"] > 1 else ""
        parts.append(f"{ref} vs {k}: **{v:.2f}x**{extra}")
    return "\n\n" + "; ".join(parts)


def busy_warning(report: dict[str, Any], samples: list[float], log=print) -> None:
    """Record the busiest CPU sample of other processes, the largest steal share of any run
    (``cpu_steal`` of the runs in ``report["runs"]``) and how far the speed probe before each run
    drifted (max / min); warn (and note) above the thresholds."""
    busy = max(samples, default=0.0)
    report["cpu_busy_others_max"] = busy
    msgs = []
    if busy > BUSY_THRESHOLD:
        msgs.append(f"other processes used up to {busy:.0%} of the CPU during this run: numbers are noisy")
    steal = max((r.get("cpu_steal", 0.0) for rs in report.get("runs", {}).values() if isinstance(rs, list)
                 for r in rs if isinstance(r, dict)), default=0.0)
    report["cpu_steal_max"] = steal
    if steal > STEAL_THRESHOLD:
        msgs.append(f"the hypervisor took up to {steal:.0%} of this virtual machine's CPU during a run "
                    f"(steal time): numbers are noisy")
    probes = [r for rs in report.get("runs", {}).values() if isinstance(rs, list) for r in rs
              if isinstance(r, dict) and r.get("probe_gflops")]
    if len(probes) > 1:
        drift = {k: max(r[k] for r in probes) / min(r[k] for r in probes) for k in ("probe_gflops", "probe_gbs")}
        report["machine_speed_drift"] = drift
        if max(drift.values()) > DRIFT_THRESHOLD:
            msgs.append(f"the machine's own speed drifted between runs (a one-thread probe before each: matmul "
                        f"{drift['probe_gflops']:.2f}x, memory read {drift['probe_gbs']:.2f}x max/min): "
                        f"compare runs of one repeat (paired ratios), not medians across repeats")
    for msg in msgs:
        log(f"warning: {msg}")
        report.setdefault("notes", []).append(msg)


def cell(s: dict[str, float] | None, fmt: str) -> str:
    """'median (min-max)' of a summarised metric, or just the median for one run."""
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return format(s["median"], fmt)
    return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"


def summary_table(summary: dict[str, dict], columns: list[tuple[str, str, str]]) -> str:
    rows = ["| system | " + " | ".join(h for _, h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, s in summary.items():
        rows.append(f"| {name} | " + " | ".join(cell(s.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(rows)


def standard_systems(a: argparse.Namespace, s: BenchSettings, extra: dict[str, Any],
                     names: tuple[str, ...] = ("slimlm", "transformers", "llama.cpp")) -> tuple[dict[str, dict], list[str]]:
    """Worker args for slimlm and the baselines that are available (the others become notes)."""
    from slimlm.bench.systems import gguf_for_llamacpp, unavailable

    systems, notes = {}, []
    for name in names:
        if name in s.skip:
            continue
        why = unavailable(name, s.model)
        if why:
            notes.append(why)
            continue
        args = {**s.base_args(), **extra, "system": name}
        if name == "llama.cpp":
            path, quant = gguf_for_llamacpp(s.model, getattr(a, "gguf", None))
            args.update(gguf=path, n_ctx=int(extra.get("n_ctx", 8192)))
            notes.append(f"llama.cpp runs {Path(path).name} ({quant} weights, F16 KV cache)")
        systems[name] = args
    return systems, notes
