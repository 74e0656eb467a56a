"""Prefix-cache hit rate of each routing policy over N real engines, deterministic given the workload.

``python -m slimlm.cluster.routing_bench [--model M] [--replicas 2] [--groups 8] [--per-group 8]``

Workload: ``groups`` system prompts (each a few hundred tokens, different from the first token
on), ``per_group`` user questions for each, arriving interleaved in a seeded random order, in
waves of ``wave`` concurrent requests. Each replica is an LLMEngine of its own (own KV pool and
prefix cache; the weights are shared in-process); the router sees each replica's in-flight count
as its load, exactly as the ingress does. Reported: prompt tokens served from a prefix cache /
prompt tokens, per policy (and for one engine holding everything, the upper bound). Only the
prefill matters, so each request generates one token; no timing is involved.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

from slimlm.cluster.routing import ROUTERS, prefix_keys
from slimlm.cluster.replicas import ROUTE_BLOCKS

TOPICS = ["a bakery", "a railway timetable", "tax forms", "a chess club", "a hiking trail", "a library catalogue",
          "an orchestra", "a garden centre", "a bike repair shop", "a weather station", "a museum", "a ferry line"]


def workload(groups: int, per_group: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Chat requests: ``groups`` system prompts x ``per_group`` questions, interleaved at random."""
    if not 1 <= groups <= len(TOPICS):
        raise ValueError(f"groups must be 1..{len(TOPICS)}, got {groups}")
    reqs = []
    for g in range(groups):
        system = (f"You answer questions for {TOPICS[g]}. " + f"Be precise and friendly about {TOPICS[g]}; "
                  "cite opening hours, prices and rules when asked, and say when you do not know. " * 6)
        reqs += [[{"role": "system", "content": system}, {"role": "user", "content": f"Question {q} about "
                  f"{TOPICS[g]}: what should I know first?"}] for q in range(per_group)]
    random.Random(seed).shuffle(reqs)
    return reqs


def hit_rate(lm, engine_kw: dict[str, Any], prompts: list[list[int]], replicas: int, policy: str | None,
             wave: int, max_imbalance: int = 4) -> dict[str, Any]:
    """Route ``prompts`` over fresh engines; cached / total prompt tokens and requests per replica."""
    from slimlm.engine.config import EngineConfig
    from slimlm.engine.engine import LLMEngine
    from slimlm.engine.params import SamplingParams

    cfg = EngineConfig(**engine_kw)
    n = replicas if policy else 1
    engines = [LLMEngine(lm, cfg) for _ in range(n)]
    router = ROUTERS.get(policy)(n, max_imbalance) if policy else None
    sp = SamplingParams(temperature=0, max_tokens=1)
    cached = total = 0
    per_replica = [0] * n
    for start in range(0, len(prompts), wave):
        owner: dict[str, int] = {}
        for i, ids in enumerate(prompts[start:start + wave], start):
            r = router.choose(prefix_keys(ids, cfg.block_size, ROUTE_BLOCKS)).replica if router else 0
            if router:
                router.started(r)
            owner[engines[r].add_request(ids, sp, request_id=f"r{i}")] = r
            per_replica[r] += 1
        while any(e.has_unfinished() for e in engines):
            for e in engines:
                if not e.has_unfinished():
                    continue
                for out in e.step():
                    if out.finished:
                        cached += out.num_cached_tokens
                        total += len(out.prompt_token_ids)
                        if router:
                            router.finished(owner[out.request_id])
    return {"policy": policy or "one engine", "replicas": n, "hit_rate": cached / total, "cached_tokens": cached,
            "prompt_tokens": total, "requests_per_replica": per_replica}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimlm.cluster.routing_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--wave", type=int, default=4, help="requests in flight together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    import torch

    from slimlm.model.hub import load
    from slimlm.serve.chat_input import ChatEncoder

    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load(a.model)
    enc = ChatEncoder(lm.tokenizer)
    prompts = [enc.encode(m) for m in workload(a.groups, a.per_group, a.seed)]
    rows = [hit_rate(lm, {}, prompts, a.replicas, policy, a.wave) for policy in (None, "round_robin", "prefix")]
    for r in rows:
        print(f"{r['policy']:>12}: hit rate {r['hit_rate']:.3f} ({r['cached_tokens']:,} of {r['prompt_tokens']:,} "
              f"prompt tokens cached), requests per replica {r['requests_per_replica']}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
