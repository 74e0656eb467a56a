"""Are slimlm's AMX bf16 paths further from fp32 than its AVX-512 bf16 paths? (docs/benchmarks.md,
"session 14: the AMX decode scores against fp32")

The default model greedy-decodes PROMPTS (8 everyday prompts, each 3 times in one batch, so the
engine runs batched decode steps) for 64 tokens three times, each in its own process (``SLIMLM_AMX``
is read once per process): bf16 with the AMX paths (``SLIMLM_AMX=1``, the default where the CPU has
them), bf16 without them (``SLIMLM_AMX=0``: the AVX-512 paths) and the fp32 model (the reference).
For each bf16 run it prints, per prompt, how many tokens equal fp32's before the first difference
and the median / max |log p| difference of the chosen token on that common prefix; and the same
between the two bf16 runs. Deterministic for a given machine and thread count.

  python docs/results/raw/bf16_paths_vs_fp32.py [threads]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

PROMPTS = ["The history of the printing press begins", "def quicksort(arr):",
           "Explain why the sky is blue in two sentences.", "List five fruits and their colours:",
           "Once upon a time in a small village", "The capital of France is", "Write a haiku about autumn.",
           "import numpy as np\n\n# compute the mean of"]

CHILD = r"""
import json, sys, torch
from slimlm import LLM, SamplingParams
torch.set_num_threads(int(sys.argv[3]))
prompts = json.loads(sys.argv[2])
llm = LLM("smollm2-135m-instruct", dtype=sys.argv[1])
outs = llm.generate(prompts * 3, SamplingParams(max_tokens=64, temperature=0.0, logprobs=1), use_tqdm=False)
res = [{"ids": list(o.outputs[0].token_ids), "lp": [max(d.values()) for d in o.outputs[0].logprobs]} for o in outs]
json.dump(res, sys.stdout)
"""


def run(dtype: str, amx: str, threads: str) -> list[dict]:
    env = dict(os.environ, SLIMLM_AMX=amx)
    with tempfile.TemporaryFile("w+") as out:
        subprocess.run([sys.executable, "-c", CHILD, dtype, json.dumps(PROMPTS), threads], env=env, stdout=out,
                       check=True)
        out.seek(0)
        return json.load(out)


def compare(a: list[dict], b: list[dict]) -> tuple[list[int], float, float]:
    equal, diffs = [], []
    for x, y in zip(a[:len(PROMPTS)], b[:len(PROMPTS)]):
        n = 0
        for i, (p, q) in enumerate(zip(x["ids"], y["ids"])):
            if p != q:
                break
            n += 1
            diffs.append(abs(x["lp"][i] - y["lp"][i]))
        equal.append(n)
    return equal, statistics.median(diffs), max(diffs)


def main() -> None:
    threads = sys.argv[1] if len(sys.argv) > 1 else "1"
    fp32 = run("float32", "1", threads)
    amx = run("bfloat16", "1", threads)
    avx = run("bfloat16", "0", threads)
    for name, (a, b) in {"bf16 AMX vs fp32": (amx, fp32), "bf16 AVX-512 vs fp32": (avx, fp32),
                         "bf16 AMX vs bf16 AVX-512": (amx, avx)}.items():
        equal, med, mx = compare(a, b)
        print(f"{name}: tokens equal before the first difference {equal} (sum {sum(equal)} of "
              f"{64 * len(PROMPTS)}); |d log p| on the common prefix median {med:.4f}, max {mx:.4f}")


if __name__ == "__main__":
    main()
