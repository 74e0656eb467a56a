"""The issue-16 frontier figure (docs/results/frontier-issue16.png) from the passkey reports in
docs/results/runs/, with the project's plotting (slimlm.bench.plots.frontier).

Each point: passkey-2k accuracy change (points) against KV saved (%). KV saved is deterministic:
bytes held per token vs the fp32 full cache for codecs, MiniCache and KV-head compression
(KVCacheSpec.bytes_per_block), the press ratio for kvpress (tokens kept), and the KV bytes *read*
per decoded token for the query policies (squeezed, shadowkv: they hold the full cache; the
report's kv_policy_stats). Run: PYTHONPATH=src python docs/results/frontier_issue16.py
"""

from __future__ import annotations

import json
from pathlib import Path

from slimlm.bench.plots import frontier

RUNS = Path(__file__).parent / "runs"
BASE_ACC = 1.0  # full cache, 9 of 9 (issue-11 frontier run, same prompts)

# label, report file, KV saved (%) or None to take it from the report's kv_policy_stats (bytes read)
POINTS = [
    ("int4 KV (6.40x)", "frontier-issue11.json:int4", 100 * (1 - 1 / 6.40)),
    ("H2O 20%", "frontier-issue11.json:h2o-20", 80.0),
    ("H2O 50%", "frontier-issue11.json:h2o-50", 50.0),
    ("minicache s8+int8 (5.52x)", "needle-issue16-mc-int8-s8.json", 100 * (1 - 1 / 5.52)),
    ("kvpress StreamingLLM 50%", "needle-issue16-kvpress-streamingllm-0.5.json", 50.0),
    ("kvpress SnapKV 50%", "needle-issue16-kvpress-snapkv-0.5.json", 50.0),
    ("kvpress Observed 50%", "needle-issue16-kvpress-observed-0.5.json", 50.0),
    ("kvpress Observed 80%", "needle-issue16-kvpress-observed-0.8.json", 80.0),
    ("KV heads 3->1 (3x)", "needle-issue16-kvheads1.json", 100 * (1 - 1 / 3)),
    ("squeezed (reads)", "needle-issue16-squeezed.json", None),
    ("shadowkv (reads)", "needle-issue16-shadowkv.json", None),
]


def accuracy(ref: str) -> tuple[float, dict] | None:
    name, _, config = ref.partition(":")
    path = RUNS / name
    if not path.is_file():
        return None
    rep = json.loads(path.read_text())
    if config:
        return rep["quality"][config]["needle"]["results"]["accuracy"], rep
    return rep["results"]["accuracy"], rep


def main() -> None:
    pts = []
    for label, ref, saved in POINTS:
        got = accuracy(ref)
        if got is None:
            print(f"skipped (no report): {label}")
            continue
        acc, rep = got
        if saved is None:
            st = rep.get("kv_policy_stats") or {}
            saved = 100 * (1 - st["bytes_read"] / st["bytes_full"]) if st.get("bytes_full") else None
        pts.append({"config": label, "metric": "passkey 2k", "quality_delta": (acc - BASE_ACC) * 100,
                    "memory_saved_pct": saved, "speedup_pct": None})
    print(frontier(pts, Path(__file__).parent / "frontier-issue16.png"))


if __name__ == "__main__":
    main()
