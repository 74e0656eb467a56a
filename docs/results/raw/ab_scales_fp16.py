"""Same-process interleaved A/B for mem13b (fp16 scales / minimums; native de-quantization into a
kept buffer for prefill). Alternating rounds, medians; on a loaded machine read the ratios only.

  kernel   the packed decode kernels (int4 g32, 1 row) on SmolLM2-135M's fused layer shapes, 30
           distinct copies each so the weights stream from DRAM as in a step: fp16 scales and
           minimums vs the same weights with them widened to fp32, VNNI and fp32-activation kernels
  decode   batch-1 greedy decode of the default model (WEIGHTS=int4 | gguf): fp16 vs widened fp32
           scales, two engines in one process, 32 tokens a round
  prefill  a PROMPT-token prefill (default 64; max_tokens=1, a new prompt every round): PyTorch's
           de-quantization per layer, no trim (before) vs the native one into the kept buffer, without
           and with the malloc_trim after the step (after)

Usage: THREADS=1 python docs/results/raw/ab_scales_fp16.py kernel|decode|prefill [ROUNDS]"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
what = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7


def widen(model):
    from slimlm.model.quant.linear import _Packed

    for m in model.modules():
        if isinstance(m, _Packed):
            for n in ("scales", "mins"):
                if m._buffers.get(n) is not None:
                    setattr(m, n, m._buffers[n].float())
    return model


def report(name, res, a, b):
    ma, mb = statistics.median(res[a]), statistics.median(res[b])
    print(f"{name}: {a} {ma:.4g}  {b} {mb:.4g}  {b}/{a} {mb / ma:.3f}", flush=True)


if what == "kernel":
    from slimlm.model.quant import quantize_int4
    from slimlm.model.quant.formats import native_linear

    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
    cases = []
    for _ in range(30):
        for N, K in shapes:
            p = quantize_int4(torch.randn(N, K) * 0.05, 32)
            cases.append((p.tensors(), {"qweight": p.q, "scales": p.scale.float(), "mins": p.min.float()}, K))
    for kernel in ("vnni", "fp32"):
        os.environ["SLIMLM_QLINEAR"] = kernel
        res = {"fp32 scales": [], "fp16 scales": []}
        xs = {K: torch.randn(1, K) for _, _, K in cases}
        for r in range(rounds):
            order = list(res) if r % 2 else list(res)[::-1]
            for mode in order:
                t = time.perf_counter()
                for t16, t32, K in cases:
                    native_linear("int4", 32, xs[K], t16 if mode == "fp16 scales" else t32)
                res[mode].append((time.perf_counter() - t) * 1e3)
        report(f"int4 g32 x 120 layers, 1 row, {kernel} kernel (ms)", res, "fp32 scales", "fp16 scales")

elif what == "decode":
    from slimlm import LLM, SamplingParams
    from slimlm.bench.workloads import text_prompt
    from slimlm.model.hub import load

    w = os.environ.get("WEIGHTS", "int4")
    llms = {"fp16 scales": LLM(load("smollm2-135m-instruct", "float32", weights=w), kv_cache_bytes="64M"),
            "fp32 scales": None}
    lm32 = load("smollm2-135m-instruct", "float32", weights=w)
    widen(lm32.model)
    llms["fp32 scales"] = LLM(lm32, kv_cache_bytes="64M")
    tok = lm32.tokenizer
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    res = {k: [] for k in llms}
    outs = {}
    for r in range(rounds):
        ids = text_prompt(tok, 16, offset=1000 * r)
        order = list(res) if r % 2 else list(res)[::-1]
        for k in order:
            t = time.perf_counter()
            o = llms[k].generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids
            res[k].append(32 / (time.perf_counter() - t))
            outs.setdefault(r, {})[k] = o
    same = sum(v["fp16 scales"] == v["fp32 scales"] for v in outs.values())
    report(f"{w} batch-1 decode, 16-token prompt + 32 tokens (tok/s, incl. prefill)", res, "fp32 scales", "fp16 scales")
    print(f"identical greedy tokens in {same}/{len(outs)} rounds")

elif what == "prefill":
    from slimlm import LLM, SamplingParams
    from slimlm.bench.workloads import text_prompt
    from slimlm.engine import runner
    from slimlm.model.hub import load
    from slimlm.model.quant import formats

    n = int(os.environ.get("PROMPT", "64"))
    w = os.environ.get("WEIGHTS", "int4")
    lm = load("smollm2-135m-instruct", "float32", weights=w)
    llm = LLM(lm, kv_cache_bytes="64M", max_num_batched_tokens=max(512, n))
    new, trim = formats.dequantized_matmul, runner.release_prefill_heap
    old = lambda p, x: F.linear(x, p.dequantize(x.dtype, native=False))  # noqa: E731  (the session-9 path)
    arms = {"before": (old, lambda: None), "native, no trim": (new, lambda: None), "after": (new, trim)}
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    res = {k: [] for k in arms}
    for r in range(rounds):
        order = list(res) if r % 2 else list(res)[::-1]
        for i, k in enumerate(order):
            formats.dequantized_matmul, runner.release_prefill_heap = arms[k]
            ids = text_prompt(lm.tokenizer, n, offset=2000 * (3 * r + i))
            t = time.perf_counter()
            llm.generate([ids], sp, use_tqdm=False)
            res[k].append((time.perf_counter() - t) * 1e3)
    formats.dequantized_matmul, runner.release_prefill_heap = new, trim
    report(f"{w} {n}-token prefill (ms)", res, "before", "native, no trim")
    report(f"{w} {n}-token prefill (ms)", res, "before", "after")
