"""Learning-rate sweeps across widths: does the best lr transfer (μP) or drift (standard)?

    slimlm runs lr-sweep runs/mup/* --out docs/training-mup.png

Each run folder is read for its final held-out loss (metrics.jsonl), its peak lr (the run's saved
config) and its model's width and parameterization (its checkpoint's config.json). Runs are
grouped by (parameterization, width), the optimizer named when it is not AdamW ('standard+galore'); the table gives each group's loss per lr and its best lr,
the figure one panel per parameterization with a curve per width (MiniCPM's Fig. 3 shape).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimLMError
from slimlm.train import checkpoint
from slimlm.train.compare import summarize


@dataclass(frozen=True)
class SweepPoint:
    run: str
    parameterization: str
    width: int
    lr: float
    final_val: float


def point(run: str | Path) -> SweepPoint:
    ck = checkpoint.latest_good(checkpoint.checkpoint_root(run), lambda msg: None)
    if ck is None:
        raise SlimLMError(f"{run} has no good checkpoint (not a finished training run folder)")
    try:
        state = json.loads((ck / "trainer_state.json").read_text())
        model = json.loads((ck / "config.json").read_text())
        lr = float(state["config"]["schedule"]["lr"])
        optim = state["config"].get("optim", {}).get("name", "adamw")
    except (OSError, ValueError, KeyError) as e:
        raise SlimLMError(f"{ck}: cannot read its config ({e})") from None
    par = model.get("parameterization", "standard")
    return SweepPoint(Path(run).name, par if optim == "adamw" else f"{par}+{optim}", int(model["hidden_size"]), lr,
                      summarize(run).final_val)


def groups(runs: list[str | Path], shared_width: int | None = None) -> dict[tuple[str, int], list[SweepPoint]]:
    """Points by (parameterization, width). ``shared_width``: the μP base width, where a μP model is
    the standard one (same init, forward and lrs; tested), so the standard runs there count for both."""
    out: dict[tuple[str, int], list[SweepPoint]] = {}
    for r in runs:
        p = point(r)
        out.setdefault((p.parameterization, p.width), []).append(p)
        if shared_width is not None and p.width == shared_width and p.parameterization == "standard":
            out.setdefault(("mup", p.width), []).append(p)
    return {k: sorted(v, key=lambda p: p.lr) for k, v in sorted(out.items())}


def table(g: dict[tuple[str, int], list[SweepPoint]]) -> list[str]:
    lrs = sorted({p.lr for ps in g.values() for p in ps})
    rows = [f"{'parameterization':<16} {'width':>5} " + " ".join(f"{lr:>8.2e}" for lr in lrs) + f" {'best lr':>8}"]
    for (par, width), ps in g.items():
        by = {p.lr: p.final_val for p in ps}
        best = min(ps, key=lambda p: p.final_val)
        cells = " ".join(f"{by[lr]:8.4f}" if lr in by else f"{'-':>8}" for lr in lrs)
        rows.append(f"{par:<16} {width:5d} {cells} {best.lr:8.2e}")
    return rows


def plot(g: dict[tuple[str, int], list[SweepPoint]], out: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SlimLMError("plotting needs matplotlib: pip install 'slimlm[bench]'") from None
    pars = sorted({k[0] for k in g})
    fig, axes = plt.subplots(1, len(pars), figsize=(5 * len(pars), 3.6), squeeze=False, sharey=True)
    for ax, par in zip(axes[0], pars):
        for (p, width), ps in g.items():
            if p != par:
                continue
            line = ax.plot([q.lr for q in ps], [q.final_val for q in ps], "o-", label=f"width {width}")
            best = min(ps, key=lambda q: q.final_val)
            ax.plot([best.lr], [best.final_val], "*", ms=14, color=line[0].get_color())
        ax.set_xscale("log", base=2)
        lrs = sorted({q.lr for (p, _), ps in g.items() if p == par for q in ps})
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.set_xlabel("peak learning rate")
        ax.set_title(par if par != "mup" else "μP")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final held-out loss")
    lo = min(q.final_val for ps in g.values() for q in ps)
    finite = [q.final_val for ps in g.values() for q in ps if math.isfinite(q.final_val)]
    axes[0][0].set_ylim(lo - 0.05, min(max(finite), lo + 1.5) + 0.05)  # diverged runs off the top
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
