"""Paired passkey runs (issue 18): sparse prefill vs dense prefill on the same needle prompts, in
one process, prompt by prompt (each prompt: every configuration in turn, so load drifts hit both).

The prompts are exactly `slimlm eval needle`'s (same seeding: `--seed S --lengths N --depths
0.1,0.5,0.9 --trials 1`, the cell's index in the depth grid). Per prompt and configuration it
prints one JSON line: the greedy answer (8 tokens), whether it holds the passkey, the prompt's mean
NLL (teacher-forced, from the same prefill), and this process's CPU time (user, sys) and minor page
faults over the request (`getrusage`: prefill + 8 decode steps + prompt logprobs; a 1-thread
process, so CPU time is the work done, little disturbed by other processes). The engine: bf16, 1
thread, prefix caching off (each run prefills the whole prompt), the RoPE extension given; the
configurations swap the engine's attention paths (dense = the same paths without the pattern).

Usage: PYTHONPATH=src python docs/results/raw/needle_sparse_pair.py --seeds 100,200 [--length 16384]
       [--depths 0.1,0.5,0.9] [--only-depths 0.5] [--configs sparse,dense]
       [--ext dca --ext-arg context=40000 --ext-arg chunk_size=6144 ...]  > pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
from dataclasses import replace

import torch

from slimlm import LLM, SamplingParams
from slimlm.eval.needle import answer_correct, build_prompt, filler_ids


def usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--only-depths", default=None)
    ap.add_argument("--configs", default="sparse,dense")
    ap.add_argument("--ext", default="dca")
    ap.add_argument("--ext-arg", action="append", default=[], help="KEY=VALUE (repeatable)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ext_args = {}
    for kv in a.ext_arg:
        k, v = kv.split("=", 1)
        ext_args[k] = float(v) if "." in v else int(v)
    llm = LLM("smollm2-135m-instruct", dtype="bfloat16", enable_prefix_caching=False, rope_extension=a.ext,
              rope_extension_args=ext_args, sparse_prefill="vertical-slash")
    eng = llm.engine
    configs = {"sparse": eng.runner.paths, "dense": replace(eng.runner.paths, sparse_prefill=None,
                                                            sparse_prefill_native=None)}
    names = a.configs.split(",")
    tok = llm.tokenizer
    filler = filler_ids("essays", tok)
    depths = [float(x) for x in a.depths.split(",")]
    only = [float(x) for x in a.only_depths.split(",")] if a.only_depths else depths
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0)
    stop = set(eng.stop_token_ids)
    print(json.dumps({"ext": a.ext, "ext_args": ext_args, "sparse": repr(configs["sparse"].sparse_prefill),
                      "native": configs["sparse"].sparse_prefill_native is not None}), flush=True)
    for seed in [int(x) for x in a.seeds.split(",")]:
        for di, depth in enumerate(depths):
            if depth not in only:
                continue
            rng = random.Random(f"{seed}-{a.length}-{di}-0")
            key = str(rng.randint(10000, 99999))
            ids, at = build_prompt(tok, filler, a.length, depth, key, rng.randrange(1 << 30))
            for name in names:
                eng.runner.paths = configs[name]
                st = configs["sparse"].sparse_prefill.stats
                st.clear()
                u0, s0, f0 = usage()
                out = llm.generate([ids], sp, use_tqdm=False)[0]
                u1, s1, f1 = usage()
                toks = [t for t in out.outputs[0].token_ids if t not in stop]
                answer = tok.decode(toks)
                lp = [d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
                row = {"seed": seed, "depth": depth, "key": key, "config": name, "answer": answer,
                       "correct": answer_correct(answer, key), "nll": -sum(lp) / len(lp),
                       "user_s": round(u1 - u0, 2), "sys_s": round(s1 - s0, 2), "minflt": f1 - f0}
                if name == "sparse" and st:
                    row["sparse_chunks_attended"] = st["computed"] / st["causal"]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
