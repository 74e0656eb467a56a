"""The benchmark worker process: ``python -m slimlm.bench.worker --worker JSON``.

It runs one scenario's :meth:`worker` for one system and prints the result as the last JSON line,
so each measurement has a process (memory, caches, threads) of its own."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def dispatch(args: dict[str, Any]) -> dict[str, Any]:
    from slimlm.bench.registry import SCENARIOS

    return SCENARIOS.get(args["scenario"]).worker(args)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    res = dispatch(json.loads(p.parse_args().worker))
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
