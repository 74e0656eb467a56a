"""Offline throughput: the engine against transformers ``generate`` on the same workload.

Workload (the engine issue's): 64 prompts of 50-1500 tokens, half sharing a 400-token system
prompt, 128 greedy output tokens each (EOS ignored, so every system generates the same count).
slimlm gets all prompts at once; transformers gets its best configuration: prompts sorted by
length (least padding), left-padded batches of each size in ``hf_batches`` (8, 16, 32, 64), one
row each, with the same weights, dtype and threads; the ratio is against its best batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def _setup(args: dict[str, Any]):
    import torch

    torch.set_num_threads(args["threads"])
    from slimlm.bench.workloads import mixed_prompts
    from slimlm.model.hub import load

    engine = args.get("engine", {}) if args.get("system") == "slimlm" else {}
    lm = load(args["model"], dtype=args["dtype"], weights=engine.get("weights"),
              group_size=engine.get("weights_group_size"))
    # "workload": optional mixed_prompts lengths (lo, hi, system_tokens) for models with a short context
    prompts = mixed_prompts(lm.tokenizer, n=args["num_prompts"], seed=args["seed"], **args.get("workload", {}))
    return lm, prompts


def worker_slimlm(args: dict[str, Any]) -> dict[str, Any]:
    from slimlm import LLM, SamplingParams
    from slimlm.bench.machine import peak_rss_mb

    lm, prompts = _setup(args)
    llm = LLM(lm, dtype=args["dtype"], **args.get("engine", {}))
    params = SamplingParams(temperature=0, max_tokens=args["max_tokens"], ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.pool.reset_prefix_cache()
    for k in llm.engine.stats:
        llm.engine.stats[k] = 0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    st = llm.engine.stats
    return {
        "seconds": dt, "tokens_per_s": gen / dt, "generated": gen,
        "prompt_tokens": float(st["prompt_tokens"]), "computed_prompt_tokens": float(st["computed_prompt_tokens"]),
        "peak_rss_mb": peak_rss_mb(), "kv_pool_mb": llm.engine.pool.num_blocks * llm.engine.bytes_per_block / 2**20,
        "kv_peak_mb": st["kv_peak_bytes"] / 2**20,
        "preemptions": float(llm.engine.scheduler.num_preemptions),
        **({"draft_tokens": float(st["draft_tokens"]), "accepted_draft_tokens": float(st["accepted_draft_tokens"]),
            "verify_steps": float(st["verify_steps"]), "steps": float(st["steps"]),
            "speculation_off_steps": float(llm.engine.spec_guard.skipped_steps)}
           if llm.engine.spec_guard is not None else {}),
    }


def worker_transformers(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    from slimlm.bench.machine import peak_rss_mb

    lm, prompts = _setup(args)
    path = lm.path
    del lm
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args["dtype"])).eval()
    bs, pad = args["hf_batch"], 0
    padded = 0
    prompts = sorted(prompts, key=len)  # transformers' best order: similar lengths share a batch

    def run(batch_prompts, max_new):
        nonlocal padded
        L = max(map(len, batch_prompts))
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in batch_prompts])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch_prompts])
        padded += ids.numel()
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                  do_sample=False, pad_token_id=pad)

    run(prompts[:2], 4)  # warm-up
    padded = 0
    t0 = time.perf_counter()
    gen = 0
    for i in range(0, len(prompts), bs):
        out = run(prompts[i : i + bs], args["max_tokens"])
        gen += (out.shape[1] - max(map(len, prompts[i : i + bs]))) * out.shape[0]
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": gen / dt, "generated": gen,
            "prompt_tokens": float(sum(map(len, prompts))), "computed_prompt_tokens": float(padded),
            "peak_rss_mb": peak_rss_mb()}


WORKERS = {"slimlm": worker_slimlm, "transformers": worker_transformers}


def run(model: str, dtype: str = "float32", threads: int = 2, repeats: int = 2, num_prompts: int = 64,
        max_tokens: int = 128, seed: int = 0, engine: dict | None = None,
        hf_batches: tuple[int, ...] = (8, 16, 32, 64),
        systems: tuple[str, ...] = ("slimlm", "transformers"), log=print) -> dict[str, Any]:
    from slimlm.bench.machine import cpu_busy, machine_info
    from slimlm.bench.runner import interleave, summarise

    busy = cpu_busy()
    if busy > 0.15:
        log(f"warning: other processes use {busy:.0%} of the CPU; numbers will be noisy")
    base = dict(model=model, dtype=dtype, threads=threads, num_prompts=num_prompts, max_tokens=max_tokens,
                seed=seed, engine=engine or {}, hf_batches=list(hf_batches))
    jobs = {}
    for s in systems:
        if s == "transformers":
            jobs.update({f"transformers bs{b}": (__name__, {**base, "system": s, "hf_batch": b}) for b in hf_batches})
        else:
            jobs[s] = (__name__, {**base, "system": s})
    results = interleave(jobs, repeats, log)
    summary = {}
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            summary[name] = {k: summarise([r[k] for r in ok]) for k in ok[0]}
    report = {"scenario": "throughput", "settings": base, "machine": machine_info(threads),
              "cpu_busy_before": busy, "runs": results, "summary": summary}
    hf = {k: v["tokens_per_s"]["median"] for k, v in summary.items() if k.startswith("transformers")}
    if "slimlm" in summary and hf:
        best = max(hf, key=hf.get)
        report["best_transformers"] = best
        report["speedup"] = summary["slimlm"]["tokens_per_s"]["median"] / hf[best]
    return report


def table(report: dict[str, Any]) -> str:
    rows = ["| system | generated tok/s (median, min-max) | prompt tokens computed / total | peak RSS MB | "
            "KV at peak MB |", "|---|---|---|---|---|"]
    for name, s in report["summary"].items():
        tps = s["tokens_per_s"]
        kv = f"{s['kv_peak_mb']['median']:.1f}" if "kv_peak_mb" in s else "—"
        rows.append(f"| {name} | {tps['median']:.1f} ({tps['min']:.1f}-{tps['max']:.1f}) | "
                    f"{s['computed_prompt_tokens']['median']:.0f} / {s['prompt_tokens']['median']:.0f} | "
                    f"{s['peak_rss_mb']['median']:.0f} | {kv} |")
    for name, s in report["summary"].items():
        if "verify_steps" in s:  # a speculative method: what it did under this load
            m = {k: s[k]["median"] for k in ("draft_tokens", "accepted_draft_tokens", "verify_steps", "steps",
                                             "speculation_off_steps")}
            rows.append(f"\n{name}: acceptance {m['accepted_draft_tokens'] / max(m['draft_tokens'], 1):.3f}, "
                        f"{m['verify_steps']:.0f} of {m['steps']:.0f} steps verified drafts, "
                        f"{m['speculation_off_steps']:.0f} steps with speculation off (max_batch)")
    if "speedup" in report:
        best = report.get("best_transformers", "transformers")
        rows.append(f"\nslimlm / transformers at its best batch size ({best}): **{report['speedup']:.2f}x** "
                    "generated tokens/s")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    args = json.loads(p.parse_args().worker)
    res = WORKERS[args["system"]](args)
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
