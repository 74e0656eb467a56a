"""Where a packed model's resident memory goes: VmRSS / VmHWM (peak) after each phase of building
a batch-1 decode engine and decoding 16 tokens. Usage: python docs/results/raw/rss_phases.py gguf
(or int4 / int8). Deterministic within a few MB."""
import sys, time


def mem():
    with open("/proc/self/status") as f:
        d = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in f if l.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}
    with open("/proc/self/maps") as f:
        mapped = sorted({l.split()[-1].rsplit("/", 1)[-1] for l in f if l.rstrip().endswith((".gguf", ".safetensors"))})
    return d["VmRSS"], d["VmHWM"], d["RssAnon"], d["RssFile"], ", ".join(mapped) or "-"


rows = []
def phase(name):
    rows.append((name, *mem()))

phase("python")
import torch
torch.set_num_threads(1)
phase("import torch")
import slimlm
from slimlm import LLM, SamplingParams
from slimlm import kernels
for k in ("qlinear", "paged_decode", "paged_prefill", "decode_layer"):
    kernels.load(k)
phase("import slimlm + kernels")
from slimlm.model.hub import load
from slimlm.model.quant import packed_bytes
w = sys.argv[1]
lm = load("smollm2-135m-instruct", "float32", weights=w)
phase("model loaded")
pb = packed_bytes(lm.model)

llm = LLM(lm, kv_cache_bytes="16M")
phase("engine built (16 MB KV)")
llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
phase("16 tokens decoded")
print(f"weights {w}: model tensors (packed + norms) {pb / 2**20:.1f} MiB")
print("| phase | RSS MiB | peak MiB | anonymous | file-backed | weight files mapped |\n|---|---|---|---|---|---|")
for n, *v in rows:
    print("| " + " | ".join(map(str, [n, *v])) + " |")
