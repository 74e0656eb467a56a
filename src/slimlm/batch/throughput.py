"""`slimlm batch` against `LLM.generate` on the throughput workload, same engine, same prompts.

``python -m slimlm.batch.throughput [--model M] [--n 64] [--max-tokens 128] [--dtype bfloat16]``

The prompts are `slimlm bench throughput`'s (50-1,500 tokens, half share a 400-token system
prompt); every request generates ``max_tokens`` (ignore_eos, greedy). Each measured run gets a fresh
engine (so neither side finds the other's prompts in the prefix cache), the two sides alternate
over ``--repeats``, and the medians are compared; it also checks that they generated the same text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from slimlm import LLM, SamplingParams
    from slimlm.batch.local import run_local
    from slimlm.bench.workloads import mixed_prompts

    p = argparse.ArgumentParser(prog="python -m slimlm.batch.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompt", type=int, default=1500, help="longest prompt (tokens)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tok = LLM(a.model, dtype=a.dtype).tokenizer
    prompts = mixed_prompts(tok, a.n, hi=a.max_prompt, system_tokens=min(400, a.max_prompt // 3))
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)

    def run_generate():
        llm = LLM(a.model, dtype=a.dtype)  # a fresh engine: an empty prefix cache
        t0 = time.perf_counter()
        out = llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t0, [o.outputs[0].text for o in out]

    def run_batch():
        llm = LLM(a.model, dtype=a.dtype)
        with tempfile.TemporaryDirectory() as d:
            inp, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
            inp.write_text("".join(json.dumps({"custom_id": str(i), "body": {
                "prompt": ids, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True}}) + "\n"
                for i, ids in enumerate(prompts)))
            t0 = time.perf_counter()
            run_local(inp, out, llm.engine, a.model, progress=False)
            dt = time.perf_counter() - t0
            recs = {int(r["custom_id"]): r for r in map(json.loads, out.read_text().splitlines())}
        return dt, [recs[i]["response"]["body"]["choices"][0]["text"] for i in range(len(prompts))]

    times: dict[str, list[float]] = {"generate": [], "batch": []}
    texts = {}
    for r in range(a.repeats):
        order = [("generate", run_generate), ("batch", run_batch)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            dt, texts[name] = fn()
            times[name].append(dt)
    same = texts["generate"] == texts["batch"]
    t_gen, t_batch = statistics.median(times["generate"]), statistics.median(times["batch"])
    tokens = a.n * a.max_tokens
    print(json.dumps({**vars(a), "generated_tokens": tokens, "llm_generate_s": t_gen, "batch_s": t_batch,
                      "llm_generate_tok_s": tokens / t_gen, "batch_tok_s": tokens / t_batch,
                      "batch_vs_generate": t_gen / t_batch, "runs_s": times, "same_text": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
