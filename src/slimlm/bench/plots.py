"""The few chart shapes the reports use (matplotlib, headless). Each returns the PNG's path."""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimLMError


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise SlimLMError("plots need matplotlib: pip install 'slimlm[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def bars(summary: dict[str, dict], metric: str, title: str, path: Path) -> Path:
    """One bar per system: the median, with a min-max error bar."""
    plt = _plt()
    names = [n for n, s in summary.items() if metric in s]
    med = [summary[n][metric]["median"] for n in names]
    err = [[m - summary[n][metric]["min"] for n, m in zip(names, med)],
           [summary[n][metric]["max"] - m for n, m in zip(names, med)]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, med, yerr=err, capsize=4, color="#4C72B0")
    for i, m in enumerate(med):
        ax.annotate(f"{m:.3g}", (i, m), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def simple_bars(labels: list[str], values: list[float], title: str, path: Path,
                refs: list[float | None] | None = None, ref_label: str = "") -> Path:
    """Bars with an optional reference tick per bar (e.g. chance level)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(labels) + 2), 3.2))
    xs = range(len(labels))
    ax.bar(xs, values, color="#4C72B0")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    if refs:
        for i, r in enumerate(refs):
            if r is not None:
                ax.hlines(r, i - 0.4, i + 0.4, colors="#C44E52", linestyles="--", label=ref_label if i == 0 else None)
        if ref_label:
            ax.legend(fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8, rotation=15 if len(labels) > 3 else 0)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def lines(xs: list[int], series: dict[str, list[float | None]], xlabel: str, ylabel: str, title: str, path: Path,
          log: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if log:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def heatmap(grid: list[list[float | None]], rows: list[str], cols: list[str], title: str, path: Path,
            xlabel: str = "", ylabel: str = "") -> Path:
    """Cells in [0, 1] (None = not run), annotated."""
    import numpy as np

    plt = _plt()
    data = np.array([[np.nan if v is None else v for v in r] for r in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.7 * len(rows) + 1.6))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, path)


def frontier(points: list[dict], path: Path) -> Path:
    """Quality delta against speed-up and against memory saved; the baseline is the origin.

    ``points``: {"config", "metric", "speedup_pct", "memory_saved_pct", "quality_delta"} each."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    metrics = sorted({p["metric"] for p in points})
    markers = dict(zip(metrics, "osD^vP*X"))
    configs = sorted({p["config"] for p in points})
    colors = {c: plt.cm.tab10(i % 10) for i, c in enumerate(configs)}
    for ax, key, label in ((axes[0], "speedup_pct", "decode speed-up vs baseline (%)"),
                           (axes[1], "memory_saved_pct", "KV memory saved vs baseline (%)")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.scatter([0], [0], marker="*", s=160, color="black", label="baseline", zorder=3)
        for p in points:
            if p.get(key) is None or p.get("quality_delta") is None:
                continue
            ax.scatter(p[key], p["quality_delta"], marker=markers[p["metric"]], color=colors[p["config"]], s=50, zorder=3)
            ax.annotate(p["config"], (p[key], p["quality_delta"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("quality change vs baseline\n(accuracy points or % perplexity; higher is better)", fontsize=8)
    handles = [plt.Line2D([], [], marker=markers[m], ls="", color="grey", label=m) for m in metrics]
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle("efficiency frontier (baseline at the origin)", fontsize=10)
    return _save(fig, path)


def kv_throughput(rows: list[dict], baseline_label: str, title: str, path: Path) -> Path:
    """Tokens/s against KV held at peak, one point per configuration; the baseline starred.

    ``rows``: {"config", "kv_peak_mb", "tokens_per_s": {"median", "min", "max"}} each (a min-max bar)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(rows):
        tps, base = r["tokens_per_s"], r["config"] == "baseline"
        ax.errorbar(r["kv_peak_mb"], tps["median"], yerr=[[tps["median"] - tps["min"]], [tps["max"] - tps["median"]]],
                    fmt="*" if base else "o", ms=14 if base else 7, capsize=3, zorder=3,
                    color="black" if base else plt.cm.tab10(i % 10))
        ax.annotate(baseline_label if base else r["config"], (r["kv_peak_mb"], tps["median"]), fontsize=7,
                    xytext=(5, 4), textcoords="offset points")
    ax.set_xlim(0, 1.25 * max(r["kv_peak_mb"] for r in rows))  # room for the labels
    ax.set_ylim(0, 1.15 * max(r["tokens_per_s"]["max"] for r in rows))
    ax.set_xlabel("KV held at peak (MB)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)
