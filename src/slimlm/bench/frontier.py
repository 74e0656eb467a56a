"""``frontier``: speed, memory and quality of engine configurations against a baseline.

``slimlm bench frontier --config NAME='ENGINE FLAGS' ...``: the baseline is the engine the rest
of the command line describes; each configuration adds its own engine flags on top (the same
flags as ``slimlm serve``, e.g. ``--kv-policy sink --kv-policy-arg window=256`` or
``--dtype bfloat16``). For every configuration:

- speed and memory: the ``decode`` worker (``--prompt-tokens``, ``--max-tokens``), all
  configurations interleaved over ``--repeats``: decode tokens/s and the KV bytes held at peak;
- quality: the ``--quality`` tasks through the engine, with small defaults (:data:`TASK_DEFAULTS`,
  changed with ``--quality-arg task.field=value``; ``--quality none`` for none);
- with ``--batch-panel``, continuous batching: the ``throughput`` workload (``--num-prompts``
  prompts, half sharing a system prompt, ``--batch-max-tokens`` tokens each; bench/throughput.py's
  worker) through the engine, all configurations interleaved over ``--repeats``: generated
  tokens/s and the KV bytes held at peak, with ratios to the baseline. A configuration the engine
  refuses shows its one-line reason in its row.

A configuration may also name another ``--model`` (e.g. a ``slimlm compress-kv`` checkpoint).

Each configuration is then a point per quality metric: speed-up (%) and KV memory saved (%)
against quality change (accuracy points, or % perplexity, both signed so higher is better),
with the baseline at the origin.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
from pathlib import Path
from typing import Any

from slimlm.bench.base import SCENARIOS, BenchSettings, Scenario, busy_warning, cell, paired_speedups, resolve
from slimlm.errors import SlimLMError

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "perplexity": {"corpora": ["prose"], "max_tokens": 4096},
    "needle": {"lengths": [1024], "depths": [0.1, 0.5, 0.9], "trials": 3},
    "mc": {"limit": 50},
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise SlimLMError(f"--config: {message}")


def parse_config(spec: str, baseline: dict[str, Any], dtype: str,
                 model: str) -> tuple[str, str, str, dict[str, Any]]:
    """'NAME=FLAGS' -> (name, model, dtype, engine keywords = baseline + the flags that are set);
    ``--model`` among the flags replaces the baseline's model."""
    from slimlm.engine.options import add_engine_args, engine_config_from_args

    name, sep, flags = spec.partition("=")
    if not sep or not name.strip():
        raise SlimLMError(f"--config expects NAME='ENGINE FLAGS', got {spec!r}")
    p = _Parser(prog="--config", add_help=False)
    p.add_argument("--model", default=None)
    add_engine_args(p)
    defaults = engine_config_from_args(p.parse_args([]))
    parsed = p.parse_args(shlex.split(flags))
    given = engine_config_from_args(parsed)
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    cfg_dtype = changed.pop("dtype", dtype)
    return name.strip(), parsed.model or model, cfg_dtype, {**baseline, **changed}


def batch_workload(context: int, max_tokens: int, notes: list[str]) -> dict[str, int]:
    """The throughput workload's prompt lengths (``mixed_prompts``' lo, hi, system_tokens defaults),
    scaled down, with a note, when its longest prompt and the generated tokens exceed the context."""
    from slimlm.bench.workloads import mixed_prompts

    params = inspect.signature(mixed_prompts).parameters
    default = {k: params[k].default for k in ("lo", "hi", "system_tokens")}
    room = context - max_tokens - 1
    if default["hi"] <= room:
        return default
    if room < 100:
        raise SlimLMError(f"--batch-max-tokens {max_tokens} leaves under 100 tokens for prompts in the model's "
                          f"{context}-token context")
    w = {k: max(1, v * room // default["hi"]) for k, v in default.items()}
    notes.append(f"batch panel: prompts scaled to the model's {context}-token context: {w['lo']}-{w['hi']} tokens, "
                 f"half sharing a {w['system_tokens']}-token system prompt")
    return w


def batch_rows(runs: dict[str, list[dict]], summary: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per configuration: medians, ratios to the baseline (of the medians, and per repeat:
    the configuration and the baseline of one repeat ran in the same round), or why it did not run."""
    med = lambda c, k: summary.get(c, {}).get(k, {}).get("median")  # noqa: E731
    base_tps, base_kv = med("baseline", "tokens_per_s"), med("baseline", "kv_peak_mb")
    rows = []
    for c, rs in runs.items():
        tps, kv = med(c, "tokens_per_s"), med(c, "kv_peak_mb")
        errors = [r["error"] for r in rs if "error" in r]
        rows.append({"config": c, "tokens_per_s": summary.get(c, {}).get("tokens_per_s"), "kv_peak_mb": kv,
                     "computed_prompt_tokens": med(c, "computed_prompt_tokens"),
                     "prompt_tokens": med(c, "prompt_tokens"),
                     "preemptions": med(c, "preemptions"),
                     "speed_ratio": tps / base_tps if tps and base_tps else None,
                     "speed_ratio_per_repeat": (paired_speedups(runs, "tokens_per_s", True, ref=c).get("baseline")
                                                if c != "baseline" else None),
                     "kv_reduction": base_kv / kv if kv and base_kv else None,
                     "error": errors[0] if errors and c not in summary else None})
    return rows


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
        g.add_argument("--quality", default=None,
                       help="frontier: quality tasks, comma-separated, or none (default perplexity,needle)")
        g.add_argument("--kvpress", action="append", metavar="PRESS:RATIO",
                       help="frontier: a kvpress point (optional baseline, quality only), e.g. snapkv:0.5 "
                            "(repeatable; skipped with a note when kvpress is not installed)")
        g.add_argument("--quality-arg", action="append", metavar="TASK.FIELD=VALUE",
                       help="frontier: a quality task setting (JSON value), e.g. needle.lengths=[512,1024]")
        g.add_argument("--batch-panel", action="store_true",
                       help="frontier: also run the throughput workload (continuous batching) per configuration: "
                            "generated tokens/s and KV bytes at peak (--num-prompts, default 64)")
        g.add_argument("--batch-max-tokens", type=int, default=None,
                       help="frontier: tokens generated per prompt in the --batch-panel workload (default 128)")

    def run(self, a, s: BenchSettings) -> dict[str, Any]:
        from slimlm.bench.machine import machine_info
        from slimlm.bench.runner import interleave, summarise_runs

        configs = self.configs(a, s)
        tasks = self.tasks(a)
        notes: list[str] = []
        batch = self.batch_settings(a, configs, notes)
        prompt, new = resolve(a.prompt_tokens, 1024), resolve(a.max_tokens, 64)
        jobs = {name: ("slimlm.bench.worker", {"scenario": "decode", "system": "slimlm", "model": m, "dtype": dt,
                                               "threads": s.threads, "engine": eng, "prompt_tokens": prompt,
                                               "new_tokens": new})
                for name, (m, dt, eng) in configs.items()}
        runs = interleave(jobs, s.repeats, s.log, in_process=s.in_process, busy_seconds=0.1 if s.in_process else 0.3)
        busy = [r.get("cpu_busy_others", 0.0) for rs in runs.values() for r in rs]
        notes += [f"{k} speed run failed: {r['error']}" for k, rs in runs.items() for r in rs if "error" in r]
        panel = self.batch_panel(batch, s, configs, notes, busy) if batch else None
        quality = self.quality(s, configs, tasks, notes, busy)
        kv_notes, presses = self.kvpress_quality(a, s, tasks, quality, busy)
        report = {"scenario": "frontier",
                  "settings": {**s.base_args(), "repeats": s.repeats, "prompt_tokens": prompt, "new_tokens": new,
                               "configs": {n: {"model": m, "dtype": dt, "engine": eng}
                                           for n, (m, dt, eng) in configs.items()},
                               "config_flags": list(a.config),
                               "tasks": {t: {k: v for k, v in vars(task).items()} for t, task in tasks.items()}},
                  "machine": machine_info(s.threads), "runs": runs, "summary": summarise_runs(runs), "quality": quality,
                  "kvpress": presses, "notes": notes + kv_notes}
        if panel is not None:
            report["batch"] = panel
        report["points"] = self.points(report)
        busy_warning(report, busy, s.log)
        return report

    @staticmethod
    def configs(a, s: BenchSettings) -> dict[str, tuple[str, str, dict[str, Any]]]:
        """{name: (model, dtype, engine keywords)}, the baseline first."""
        if not a.config:
            raise SlimLMError("frontier needs at least one --config NAME='ENGINE FLAGS'")
        configs = {"baseline": (s.model, s.dtype, dict(s.engine))}
        for spec in a.config:
            name, model, dt, eng = parse_config(spec, s.engine, s.dtype, s.model)
            if name in configs:
                raise SlimLMError(f"--config name '{name}' is used twice")
            configs[name] = (model, dt, eng)
        return configs

    @staticmethod
    def tasks(a) -> dict[str, Any]:
        """The ``--quality`` tasks with their settings (none for ``--quality none``)."""
        from slimlm.eval.registry import TASKS

        spec = a.quality or "perplexity,needle"
        task_names = [] if spec.strip() == "none" else [t.strip() for t in spec.split(",") if t.strip()]
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
        return tasks

    @staticmethod
    def quality(s: BenchSettings, configs, tasks, notes: list[str], busy: list[float]) -> dict[str, dict[str, Any]]:
        """Each configuration's task results; one the engine refuses is a note (the baseline's refusal
        stops the run)."""
        from slimlm.eval.cli import evaluate, scoring_lm

        quality: dict[str, dict[str, Any]] = {}
        for name, (m, dt, eng) in configs.items():
            quality[name] = {}
            if not tasks:
                continue
            s.log(f"quality: {name}")
            try:
                lm = scoring_lm(m, "slimlm", dt, s.threads, eng)
            except (SlimLMError, ValueError) as e:  # the engine's start-up refusals (the CLI's one-line errors)
                if name == "baseline":
                    raise
                notes.append(f"{name}: quality not measured: {e}")
                continue
            for t, task in tasks.items():
                rep = evaluate(task, lm, {"model": m, "dtype": dt, "threads": s.threads, "engine": eng}, s.log)
                busy.append(rep["cpu_busy_others_max"])
                quality[name][t] = {"results": rep["results"], "seconds": rep["seconds"]}
            del lm
        return quality

    @staticmethod
    def batch_settings(a, configs, notes: list[str]) -> dict[str, Any] | None:
        """Prompts, tokens each and prompt lengths of ``--batch-panel``, or None; its flags without it
        are a mistake."""
        from slimlm.bench.prefill import context_of

        n, new = getattr(a, "num_prompts", None), a.batch_max_tokens
        if not a.batch_panel:
            if n is not None or new is not None:
                raise SlimLMError("frontier: --num-prompts and --batch-max-tokens apply only with --batch-panel")
            return None
        n, new = resolve(n, 64), resolve(new, 128)
        if n < 1 or new < 1:
            raise SlimLMError(f"--batch-panel needs --num-prompts >= 1 and --batch-max-tokens >= 1, got {n} and {new}")
        workload = batch_workload(min(context_of(m) for m, _, _ in configs.values()), new, notes)
        return {"num_prompts": n, "max_tokens": new, "workload": workload}

    @staticmethod
    def batch_panel(batch: dict[str, Any], s: BenchSettings, configs, notes: list[str],
                    busy: list[float]) -> dict[str, Any]:
        """The throughput workload through the engine with each configuration, interleaved with the
        baseline over the repeats (continuous batching): generated tokens/s and KV bytes at peak."""
        from slimlm.bench.runner import interleave, summarise_runs

        jobs = {name: ("slimlm.bench.worker", {"scenario": "frontier", "system": "slimlm", "model": m, "dtype": dt,
                                               "threads": s.threads, "engine": eng, "seed": 0, **batch})
                for name, (m, dt, eng) in configs.items()}
        s.log("batch panel: the throughput workload per configuration")
        runs = interleave(jobs, s.repeats, s.log, in_process=s.in_process, busy_seconds=0.1 if s.in_process else 0.3)
        busy += [r.get("cpu_busy_others", 0.0) for rs in runs.values() for r in rs]
        summary = summarise_runs(runs)
        notes += [f"{k} batch run failed: {r['error']}" for k, rs in runs.items() for r in rs
                  if "error" in r and k in summary]  # a configuration that never ran shows why in its row
        return {**batch, "runs": runs, "summary": summary, "rows": batch_rows(runs, summary)}

    @staticmethod
    def worker(args: dict[str, Any]) -> dict[str, Any]:
        """The batch panel's measurement: bench/throughput.py's engine run of its workload."""
        from slimlm.bench.throughput import worker_slimlm

        return worker_slimlm(args)

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

    @staticmethod
    def speed_memory(report: dict[str, Any], c: str) -> tuple[float | None, float | None]:
        """(decode speed-up %, KV memory saved %) of configuration ``c`` against the baseline."""
        summ = report["summary"]
        med = lambda c, k: summ.get(c, {}).get(k, {}).get("median")  # noqa: E731
        base_tps, base_kv = med("baseline", "decode_tok_s"), med("baseline", "kv_mb")
        tps, kv = med(c, "decode_tok_s"), med(c, "kv_mb")
        saved = (1 - kv / base_kv) * 100 if kv is not None and base_kv else None
        if c in report.get("kvpress", {}):  # no speed run; the KV kept by the press, per prompt token
            saved = report["kvpress"][c]["ratio"] * 100
        return ((tps / base_tps - 1) * 100 if tps and base_tps else None), saved

    def points(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        from slimlm.eval.registry import TASKS

        qual = report["quality"]
        base_q = {m: (v, hib) for t, q in qual["baseline"].items() for m, v, hib in TASKS.get(t)().headline(q["results"])}
        pts = []
        for c in qual:
            speedup, saved = self.speed_memory(report, c)
            for t, q in qual[c].items():
                for m, v, hib in TASKS.get(t)().headline(q["results"]):
                    pts.append({"config": c, "metric": m, "value": v, "baseline_value": base_q.get(m, (None,))[0],
                                "quality_delta": quality_delta(v, base_q.get(m, (None,))[0], hib),
                                "speedup_pct": speedup, "memory_saved_pct": saved})
        return pts

    def table(self, report: dict[str, Any]) -> str:
        summ = report["summary"]
        metrics = list(dict.fromkeys(p["metric"] for p in report["points"]))
        header = ["config", "flags", "first token ms", "decode tok/s", "speed-up", "KV MB held", "KV saved", *metrics]
        rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        flags = {"baseline": "(command line)"}
        flags.update({f.partition("=")[0].strip(): f.partition("=")[2] for f in report["settings"]["config_flags"]})
        for c in report["quality"]:
            pts = {p["metric"]: p for p in report["points"] if p["config"] == c}
            sp, ms = self.speed_memory(report, c)
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
                        f"{'-' if ms is None else f'{ms:+.0f}%'} |" + "".join(f" {q} |" for q in qcells))
        st = report["settings"]
        text = ("\n".join(rows) + f"\n\nSpeed: batch-1 decode of {st['new_tokens']} tokens after a {st['prompt_tokens']}"
                "-token prompt; KV MB held at peak." + (" Quality change in brackets: accuracy points, or % perplexity "
                                                        "(positive = better)." if metrics else ""))
        return text + ("\n\n" + batch_table(report["batch"]) if "batch" in report else "")

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import frontier, kv_throughput

        pts = [p for p in report["points"] if p["config"] != "baseline"]
        pngs = [frontier(pts, out.with_suffix(".png"))] if pts else []
        rows = [r for r in report.get("batch", {}).get("rows", []) if r["tokens_per_s"] and r["kv_peak_mb"]]
        if rows:
            label = "baseline (full KV)" if full_kv(report["settings"]["engine"]) else "baseline"
            pngs.append(kv_throughput(rows, label, f"continuous batching: {report['batch']['num_prompts']} prompts x "
                                                   f"{report['batch']['max_tokens']} tokens",
                                      out.with_name(out.name + "-batch.png")))
        return pngs


def full_kv(engine: dict[str, Any]) -> bool:
    """Whether an engine keeps every token's KV at the model's precision (no policy, no KV codec)."""
    return not engine.get("kv_policy") and engine.get("kv_cache_dtype", "auto") == "auto"


def batch_table(panel: dict[str, Any]) -> str:
    """The continuous-batching panel: one row per configuration, ratios to the baseline."""
    rows = ["| config | generated tok/s | tok/s vs baseline | KV at peak MB | KV less than baseline | "
            "prompt tokens computed / total | preemptions |", "|---" * 7 + "|"]
    for r in panel["rows"]:
        if r["error"]:
            reason = r["error"].replace("|", "\\|")
            rows.append(f"| {r['config']} | not run: {reason} | - | - | - | - | - |")
            continue
        pr = r["speed_ratio_per_repeat"]
        ratio = "-" if r["speed_ratio"] is None else f"{r['speed_ratio']:.2f}x"
        if pr and pr["n"] > 1:
            ratio += f" (per repeat {pr['min']:.2f}-{pr['max']:.2f})"
        kv_less = "-" if r["kv_reduction"] is None else f"{r['kv_reduction']:.2f}x"
        prompts = ("-" if r["prompt_tokens"] is None
                   else f"{r['computed_prompt_tokens']:.0f} / {r['prompt_tokens']:.0f}")
        rows.append(f"| {r['config']} | {cell(r['tokens_per_s'], '.1f')} | {ratio} | "
                    f"{cell_value(r['kv_peak_mb'], '.1f')} | {kv_less} | {prompts} | "
                    f"{cell_value(r['preemptions'], '.0f')} |")
    w = panel["workload"]
    return ("Continuous batching (the `throughput` workload through the engine): "
            f"{panel['num_prompts']} prompts of {w['lo']}-{w['hi']} tokens, half sharing a {w['system_tokens']}-token "
            f"system prompt, {panel['max_tokens']} generated tokens each, all at once; "
            "generated tokens/s (median, min-max), KV held at peak (median); ratios against the baseline of the "
            "same run.\n\n" + "\n".join(rows))


def cell_value(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)
