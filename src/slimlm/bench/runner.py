"""Run benchmark workers in separate processes, interleaved, and summarise repeats.

Each system (slimlm with some engine options, transformers, llama.cpp...) runs in its own
process so peak memory is its own and one run cannot warm the other's caches. Repeats go
A B A B ..., and ratios are taken between medians of the same run. Before each worker starts,
the CPU use of other processes is sampled (nothing of ours runs then), so a noisy run shows.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any


def run_worker(module: str, args: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m module --worker JSON`` and parse the JSON it prints last."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": tail[0]}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "worker printed no result"}


def run_in_process(args: dict[str, Any]) -> dict[str, Any]:
    """The same worker in this process (tests, debugging); errors become results like above."""
    from slimlm.bench.worker import dispatch

    try:
        return dispatch(args)
    except Exception as e:  # noqa: BLE001 - reported like a failed subprocess
        return {"error": f"{type(e).__name__}: {e}"}


def summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); NaN for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def summarise_runs(results: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """{system: [run, ...]} -> {system: {metric: median/min/max/n}} over the runs without errors
    (numeric metrics only)."""
    summary = {}
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            keys = [k for k, v in ok[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            summary[name] = {k: summarise([r[k] for r in ok if k in r]) for k in keys}
    return summary


def interleave(systems: dict[str, tuple[str, dict]], repeats: int, log=print, in_process: bool = False,
               busy_seconds: float = 0.3) -> dict[str, list[dict]]:
    """{name: (module, args)} -> {name: [result per repeat]}, running A B A B ...

    Each result gets ``cpu_busy_others``: the CPU share other processes used just before it ran,
    ``cpu_steal``: the share the hypervisor took while it ran (a virtual machine's neighbours), and
    ``probe_gflops`` / ``probe_gbs``: the machine's own speed just before it (:func:`speed_probe`)."""
    from slimlm.bench.machine import cpu_busy, cpu_ticks, speed_probe, steal_share

    results: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(repeats):
        for name, (module, args) in systems.items():
            busy = cpu_busy(busy_seconds) if busy_seconds > 0 else 0.0
            probe = speed_probe() if busy_seconds > 0 else {}
            log(f"[repeat {r + 1}/{repeats}] {name} ...")
            t0 = cpu_ticks()
            res = run_in_process(args) if in_process else run_worker(module, args)
            steal = steal_share(t0, cpu_ticks())
            if "error" in res:
                log(f"  {name} failed: {res['error']}")
            else:
                log(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float))[:300])
            res["cpu_busy_others"] = busy
            res["cpu_steal"] = steal
            res.update(probe)
            results[name].append(res)
    return results
