"""Draw learning-rate schedules (and, optionally, the loss curves of runs) to one PNG."""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimLMError
from slimlm.train.config import TrainConfig, schedule_name
from slimlm.train.metrics import read_metrics
from slimlm.train.schedules import Horizon


def horizon(cfg: TrainConfig, steps: int | None = None) -> Horizon:
    d = cfg.data
    seqs = d.micro_batch * cfg.train.grad_accum
    return Horizon(steps or cfg.train.steps, seqs * d.seq_len, seqs)


def lr_curve(cfg: TrainConfig, steps: int | None = None) -> list[float]:
    h = horizon(cfg, steps)
    return [cfg.schedule(s, h) for s in range(h.total_steps)]


def plot(configs: dict[str, TrainConfig], out: str | Path, runs: list[str | Path] = (), steps: int | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SlimLMError("plotting needs matplotlib: pip install 'slimlm[bench]'") from None
    panels = 2 if runs else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), squeeze=False)
    ax = axes[0][0]
    for label, cfg in configs.items():
        ax.plot(range(1, (steps or cfg.train.steps) + 1), lr_curve(cfg, steps), label=f"{label} ({schedule_name(cfg.schedule)})")
    ax.set_xlabel("update")
    ax.set_ylabel("learning rate")
    ax.legend()
    if runs:
        ax = axes[1][0]
        for run in runs:
            f = Path(run) / "metrics.jsonl"
            if not f.is_file():
                raise SlimLMError(f"{run} has no metrics.jsonl")
            recs = read_metrics(f)
            train = [(r["tokens"], r["loss"]) for r in recs if r.get("loss") is not None]
            line = ax.plot(*zip(*train), label=f"{Path(run).name} train", alpha=0.8) if train else None
            for key in sorted({k for r in recs for k in r if k.startswith("val_loss/")}):
                tok = {r["step"]: r["tokens"] for r in recs if "tokens" in r}
                per_update = tok[max(tok)] / max(tok) if tok and max(tok) else 0  # evals between logged updates
                pts = [(tok.get(r["step"], round(r["step"] * per_update)), r[key]) for r in recs if key in r]
                color = line[0].get_color() if line else None
                ax.plot(*zip(*pts), "o--", color=color, label=f"{Path(run).name} {key}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
