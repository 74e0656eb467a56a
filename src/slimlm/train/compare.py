"""Compare finished runs against a baseline run (the Languini way: equal tokens or equal time).

    slimlm runs compare runs/baseline runs/galore runs/mixln

Per run, from its metrics.jsonl: final held-out loss and its change vs the baseline, optimizer
state bytes (recorded after the first update), median tokens/s, and the tokens at which the
held-out loss first reached the baseline's final one (linear between evaluations; '-' if never):
G_stack's "tokens to reach the same loss".
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimLMError
from slimlm.train.metrics import read_metrics


@dataclass
class RunSummary:
    name: str
    final_val: float
    tokens: int
    optim_state_bytes: int | None
    tok_per_s: float | None
    curve: list[tuple[int, float]]
    """(tokens, held-out loss) at each evaluation."""


def summarize(run: str | Path) -> RunSummary:
    f = Path(run) / "metrics.jsonl"
    if not f.is_file():
        raise SlimLMError(f"{run} has no metrics.jsonl (not a training run folder)")
    recs = read_metrics(f)
    keys = sorted({k for r in recs for k in r if k.startswith("val_loss/")})
    if not keys:
        raise SlimLMError(f"{run} has no held-out evaluation in its metrics")
    tok = {r["step"]: r["tokens"] for r in recs if "tokens" in r}
    per_update = tok[max(tok)] / max(tok) if tok and max(tok) else 0  # evaluations between logged updates
    curve = [(tok.get(r["step"], round(r["step"] * per_update)), r[keys[0]]) for r in recs if keys[0] in r]
    mem = next((r["optim_state_bytes"] for r in recs if "optim_state_bytes" in r), None)
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    return RunSummary(Path(run).name, curve[-1][1], max(tok.values(), default=0), mem,
                      statistics.median(tps) if tps else None, curve)


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which the loss is <= target, interpolated between evaluations."""
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return float(t)
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
        prev = (t, v)
    return None


def compare(baseline: str | Path, runs: list[str | Path]) -> list[str]:
    base = summarize(baseline)
    rows = [f"{'run':<16} {'final val':>9} {'vs base':>8} {'optim state MiB':>15} {'vs base':>8} "
            f"{'tok/s':>7} {'tokens':>9} {'tokens to base final':>20}"]
    for s in [base, *(summarize(r) for r in runs)]:
        mem = f"{s.optim_state_bytes / 2**20:.1f}" if s.optim_state_bytes else "-"
        dmem = (f"{100 * (s.optim_state_bytes / base.optim_state_bytes - 1):+.1f}%"
                if s.optim_state_bytes and base.optim_state_bytes else "-")
        reach = tokens_to_reach(s.curve, base.final_val)
        rows.append(f"{s.name:<16} {s.final_val:9.4f} {100 * (s.final_val / base.final_val - 1):+7.2f}% {mem:>15} "
                    f"{dmem:>8} {s.tok_per_s or 0:7.0f} {s.tokens:9,} {f'{reach:,.0f}' if reach else '-':>20}")
    return rows
