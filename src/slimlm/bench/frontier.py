"""``frontier``: speed, memory and quality of engine configurations against a baseline.

``slimlm bench frontier --config NAME='ENGINE FLAGS' ...``: the baseline is the engine the rest
of the command line describes; each configuration adds its own engine flags on top (the same
flags as ``slimlm serve``, e.g. ``--kv-policy sink --kv-policy-arg window=256`` or
``--dtype bfloat16``). For every configuration:

- speed and memory: the ``decode`` worker (``--prompt-tokens``, ``--max-tokens``), all
  configurations interleaved over ``--repeats``: decode tokens/s and the KV bytes held at peak;
- quality: the ``--quality`` tasks through the engine, with small defaults (:data:`TASK_DEFAULTS`,
  changed with ``--quality-arg task.field=value``).

Each configuration is then a point per quality metric: speed-up (%) and KV memory saved (%)
against quality change (accuracy points, or % perplexity, both signed so higher is better),
with the baseline at the origin.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from slimlm.bench.base import SCENARIOS, BenchSettings, Scenario, busy_warning, cell, resolve
from slimlm.errors import SlimLMError

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "perplexity": {"corpora": ["prose"], "max_tokens": 4096},
    "needle": {"lengths": [1024], "depths": [0.1, 0.5, 0.9], "trials": 3},
    "mc": {"limit": 50},
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise SlimLMError(f"--config: {message}")


def parse_config(spec: str, baseline: dict[str, Any], dtype: str) -> tuple[str, str, dict[str, Any]]:
    """'NAME=FLAGS' -> (name, dtype, engine keywords = baseline + the flags that are set)."""
    from slimlm.engine.options import add_engine_args, engine_config_from_args

    name, sep, flags = spec.partition("=")
    if not sep or not name.strip():
        raise SlimLMError(f"--config expects NAME='ENGINE FLAGS', got {spec!r}")
    p = _Parser(prog="--config", add_help=False)
    add_engine_args(p)
    defaults = engine_config_from_args(p.parse_args([]))
    given = engine_config_from_args(p.parse_args(shlex.split(flags)))
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    cfg_dtype = changed.pop("dtype", dtype)
    return name.strip(), cfg_dtype, {**baseline, **changed}


def quality_delta(value: float, base: float, higher_is_better: bool) -> float | None:
    """Accuracy-like (in [0, 1], higher better): points; otherwise % change, positive = better."""
    if base is None or value is None:
        return None
    if higher_is_better and 0 <= base <= 1 and 0 <= value <= 1:
        return (value - base) * 100
    if not base or not value:
        return None
    return (value / base - 1) * 100 if higher_is_better else (base / value - 1) * 100


@SCENARIOS.register("frontier")
class Frontier(Scenario):
    help = "speed + memory + quality of engine configurations vs the baseline, plotted"

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--config", action="append", metavar="NAME='FLAGS'",
                       help="frontier: a configuration: name and engine flags (repeatable)")
        g.add_argument("--quality", default=None, help="frontier: quality tasks, comma-separated (default perplexity,needle)")
        g.add_argument("--kvpress", action="append", metavar="PRESS:RATIO",
                       help="frontier: a kvpress point (optional baseline, quality only), e.g. snapkv:0.5 "
                            "(repeatable; skipped with a note when kvpress is not installed)")
        g.add_argument("--quality-arg", action="append", metavar="TASK.FIELD=VALUE",
                       help="frontier: a quality task setting (JSON value), e.g. needle.lengths=[512,1024]")

    def run(self, a, s: BenchSettings) -> dict[str, Any]:
        from slimlm.bench.machine import machine_info
        from slimlm.bench.runner import interleave, summarise_runs
        from slimlm.eval.cli import evaluate, scoring_lm
        from slimlm.eval.registry import TASKS

        if not a.config:
            raise SlimLMError("frontier needs at least one --config NAME='ENGINE FLAGS'")
        configs = {"baseline": (s.dtype, dict(s.engine))}
        for spec in a.config:
            name, dt, eng = parse_config(spec, s.engine, s.dtype)
            if name in configs:
                raise SlimLMError(f"--config name '{name}' is used twice")
            configs[name] = (dt, eng)
        task_names = [t.strip() for t in (a.quality or "perplexity,needle").split(",") if t.strip()]
        tasks = {}
        for t in task_names:
            kw = dict(TASK_DEFAULTS.get(t, {}))
            for item in a.quality_arg or []:
                key, _, val = item.partition("=")
                task, _, fld = key.partition(".")
                if task == t:
                    try:
                        kw[fld] = json.loads(val)
                    except ValueError:
                        kw[fld] = val
            tasks[t] = TASKS.get(t).from_dict(kw)
        prompt, new = resolve(a.prompt_tokens, 1024), resolve(a.max_tokens, 64)

        jobs = {name: ("slimlm.bench.worker", {"scenario": "decode", "system": "slimlm", "model": s.model, "dtype": dt,
                                               "threads": s.threads, "engine": eng, "prompt_tokens": prompt,
                                               "new_tokens": new})
                for name, (dt, eng) in configs.items()}
        runs = interleave(jobs, s.repeats, s.log, in_process=s.in_process, busy_seconds=0.1 if s.in_process else 0.3)
        summary = summarise_runs(runs)
        quality: dict[str, dict[str, Any]] = {}
        busy = [r.get("cpu_busy_others", 0.0) for rs in runs.values() for r in rs]
        for name, (dt, eng) in configs.items():
            s.log(f"quality: {name}")
            lm = scoring_lm(s.model, "slimlm", dt, s.threads, eng)
            quality[name] = {}
            for t, task in tasks.items():
                rep = evaluate(task, lm, {"model": s.model, "dtype": dt, "threads": s.threads, "engine": eng}, s.log)
                busy.append(rep["cpu_busy_others_max"])
                quality[name][t] = {"results": rep["results"], "seconds": rep["seconds"]}
            del lm
        notes, presses = self.kvpress_quality(a, s, tasks, quality, busy)
        report = {"scenario": "frontier",
                  "settings": {**s.base_args(), "repeats": s.repeats, "prompt_tokens": prompt, "new_tokens": new,
                               "configs": {n: {"dtype": dt, "engine": eng} for n, (dt, eng) in configs.items()},
                               "config_flags": list(a.config),
                               "tasks": {t: {k: v for k, v in vars(task).items()} for t, task in tasks.items()}},
                  "machine": machine_info(s.threads), "runs": runs, "summary": summary, "quality": quality,
                  "kvpress": presses,
                  "notes": [f"{k} speed run failed: {r['error']}" for k, rs in runs.items() for r in rs if "error" in r]
                  + notes}
        report["points"] = self.points(report)
        busy_warning(report, busy, s.log)
        return report

    @staticmethod
    def kvpress_quality(a, s: BenchSettings, tasks, quality, busy) -> tuple[list[str], dict[str, Any]]:
        """Quality of each ``--kvpress PRESS:RATIO`` point (kvpress on transformers, same examples);
        its KV saved is the press ratio (it keeps that share of every layer's tokens). Tasks a press cannot score are noted."""
        from slimlm.eval.cli import evaluate, scoring_lm
        from slimlm.eval.kvpress_lm import unavailable

        if not a.kvpress:
            return [], {}
        why = unavailable()
        if why:
            return [why], {}
        notes, presses = [], {}
        for spec in a.kvpress:
            press, sep, ratio = spec.partition(":")
            try:
                ratio_f = float(ratio)
            except ValueError:
                raise SlimLMError(f"--kvpress expects PRESS:RATIO, e.g. snapkv:0.5, got {spec!r}") from None
            name = f"kvpress-{press}-{ratio_f:g}"
            s.log(f"quality: {name}")
            lm = scoring_lm(s.model, "kvpress", "float32", s.threads, {"press": press, "ratio": ratio_f})
            quality[name] = {}
            for t, task in tasks.items():
                try:
                    rep = evaluate(task, lm, {"model": s.model, "dtype": "float32", "threads": s.threads,
                                              "engine": {"press": press, "ratio": ratio_f}}, s.log)
                except SlimLMError as e:
                    notes.append(f"{name}: {t} not scored: {e}")
                    continue
                busy.append(rep["cpu_busy_others_max"])
                quality[name][t] = {"results": rep["results"], "seconds": rep["seconds"]}
            presses[name] = {"press": press, "ratio": ratio_f, "kv_tokens_kept": list(lm.kept)}
            del lm
        return notes, presses

    def points(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        from slimlm.eval.registry import TASKS

        summ, qual = report["summary"], report["quality"]
        med = lambda c, k: summ.get(c, {}).get(k, {}).get("median")  # noqa: E731
        base_tps, base_kv = med("baseline", "decode_tok_s"), med("baseline", "kv_mb")
        base_q = {m: (v, hib) for t, q in qual["baseline"].items() for m, v, hib in TASKS.get(t)().headline(q["results"])}
        pts = []
        for c in qual:
            tps, kv = med(c, "decode_tok_s"), med(c, "kv_mb")
            saved = (1 - kv / base_kv) * 100 if kv is not None and base_kv else None
            if c in report.get("kvpress", {}):  # no speed run; the KV kept by the press, per prompt token
                saved = report["kvpress"][c]["ratio"] * 100
            for t, q in qual[c].items():
                for m, v, hib in TASKS.get(t)().headline(q["results"]):
                    pts.append({"config": c, "metric": m, "value": v, "baseline_value": base_q.get(m, (None,))[0],
                                "quality_delta": quality_delta(v, base_q.get(m, (None,))[0], hib),
                                "speedup_pct": (tps / base_tps - 1) * 100 if tps and base_tps else None,
                                "memory_saved_pct": saved})
        return pts

    def table(self, report: dict[str, Any]) -> str:
        summ = report["summary"]
        metrics = list(dict.fromkeys(p["metric"] for p in report["points"]))
        rows = ["| config | flags | first token ms | decode tok/s | speed-up | KV MB held | KV saved | "
                + " | ".join(metrics) + " |", "|---" * (7 + len(metrics)) + "|"]
        flags = {"baseline": "(command line)"}
        flags.update({f.partition("=")[0].strip(): f.partition("=")[2] for f in report["settings"]["config_flags"]})
        for c in report["quality"]:
            pts = {p["metric"]: p for p in report["points"] if p["config"] == c}
            any_p = next(iter(pts.values()), {})
            sp, ms = any_p.get("speedup_pct"), any_p.get("memory_saved_pct")
            qcells = []
            for m in metrics:
                p = pts.get(m)
                if p is None:
                    qcells.append("-")
                elif c == "baseline" or p["quality_delta"] is None:
                    qcells.append(f"{p['value']:.3f}")
                else:
                    qcells.append(f"{p['value']:.3f} ({p['quality_delta']:+.1f})")
            rows.append(f"| {c} | `{flags.get(c, '')}` | {cell(summ.get(c, {}).get('ttft_ms'), '.0f')} | "
                        f"{cell(summ.get(c, {}).get('decode_tok_s'), '.1f')} | "
                        f"{'-' if sp is None else f'{sp:+.0f}%'} | {cell(summ.get(c, {}).get('kv_mb'), '.1f')} | "
                        f"{'-' if ms is None else f'{ms:+.0f}%'} | " + " | ".join(qcells) + " |")
        st = report["settings"]
        return ("\n".join(rows) + f"\n\nSpeed: batch-1 decode of {st['new_tokens']} tokens after a {st['prompt_tokens']}"
                "-token prompt; KV MB held at peak. Quality change in brackets: accuracy points, or % perplexity "
                "(positive = better).")

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import frontier

        pts = [p for p in report["points"] if p["config"] != "baseline"]
        return [frontier(pts, out.with_suffix(".png"))] if pts else []
