"""Run benchmark workers in separate processes, interleaved, and summarise repeats.

Each system (slimlm with some engine options, transformers, llama.cpp...) runs in its own
process so peak memory is its own and one run cannot warm the other's caches. Repeats go
A B A B ..., and ratios are taken between medians of the same run.
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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "worker printed no result"}


def summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def interleave(systems: dict[str, tuple[str, dict]], repeats: int, log=print) -> dict[str, list[dict]]:
    """{name: (module, args)} -> {name: [result per repeat]}, running A B A B ..."""
    results: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(repeats):
        for name, (module, args) in systems.items():
            log(f"[repeat {r + 1}/{repeats}] {name} ...")
            res = run_worker(module, args)
            if "error" in res:
                log(f"  {name} failed: {res['error']}")
            else:
                log(f"  {name}: " + ", ".join(f"{k}={v:.1f}" for k, v in res.items() if isinstance(v, float)))
            results[name].append(res)
    return results
