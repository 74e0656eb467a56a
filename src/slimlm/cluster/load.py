"""Load on a running server (one `slimlm serve` or the replicas' ingress): requests/s, tok/s, TTFT.

``python -m slimlm.cluster.load --url http://127.0.0.1:8000 [--clients 16] [--seconds 60]``

The clients are `slimlm bench serve`'s (streaming chat, seeded sampling); this only points them
at a server started elsewhere, so 1 and N replicas are measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from slimlm.bench.serve_load import _drive, _percentile

    p = argparse.ArgumentParser(prog="python -m slimlm.cluster.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the served model name")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv)
    stats = asyncio.run(_drive(a.url.rstrip("/"), a.model, a.clients, a.seconds, a.max_tokens))
    ttft = stats.pop("ttft")
    stats["errors"] = stats["errors"][:5]
    report = {**vars(a), **stats, "requests_per_s": stats["completed"] / stats["wall_s"],
              "tokens_per_s": stats["tokens"] / stats["wall_s"],
              "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99)}
    print(json.dumps(report, indent=1))
    return 0 if stats["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
