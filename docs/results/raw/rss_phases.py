"""Where a packed model's resident memory goes: VmRSS / VmHWM (peak) after each phase of building
a batch-1 decode engine and decoding 16 tokens. Deterministic within a few MB.

Usage: python docs/results/raw/rss_phases.py gguf   (or int4 / int8: the default model's weights)
       PROMPT=bench python ...   (bench decode's workload: a 16-token warm-up, then a 64-token prompt
       of text_prompt, whose prefill takes the de-quantizing path: more than 16 rows)
       TRIM=1 python ...   (adds a last phase after glibc's malloc_trim: the freed heap still held)
       python docs/results/raw/rss_phases.py baseline   (the runtime baseline, below)
       python docs/results/raw/rss_phases.py llama.cpp  (the same phases in llama-cpp-python)

The runtime baseline is what any run pays before the weights: torch, slimlm and its kernels
imported, the model's tokenizer built from the GGUF, and an engine (16 MB KV pool) that decodes
16 tokens over the same model with next to no weights: 1 layer (the engine needs one) of the same
width and heads with a 64-wide MLP, and a 256-row tied embedding: 4.1 MiB of fp32 tensors, shown
on the last line and subtracted when the baseline is quoted. llama.cpp's
counterpart is `llama_cpp` imported and the file opened with ``vocab_only=True`` (its tokenizer,
no tensors)."""
import os
import sys


def mem():
    with open("/proc/self/status") as f:
        d = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in f if l.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}
    with open("/proc/self/maps") as f:
        mapped = sorted({l.split()[-1].rsplit("/", 1)[-1] for l in f if l.rstrip().endswith((".gguf", ".safetensors"))})
    return d["VmRSS"], d["VmHWM"], d["RssAnon"], d["RssFile"], ", ".join(mapped) or "-"


rows = []
def phase(name):
    rows.append((name, *mem()))


def table(title):
    print(title)
    print("| phase | RSS MiB | peak MiB | anonymous | file-backed | weight files mapped |\n|---|---|---|---|---|---|")
    for n, *v in rows:
        print("| " + " | ".join(map(str, [n, *v])) + " |")


w = sys.argv[1]
phase("python")
if w == "llama.cpp":
    import llama_cpp
    phase("import llama_cpp")
    from slimlm.model.hub import DEFAULT_MODEL, KNOWN_MODELS, package_file
    path = str(package_file(KNOWN_MODELS[DEFAULT_MODEL]))
    vocab = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    phase("vocab only (tokenizer)")
    del vocab
    mmap = os.environ.get("MMAP", "1") == "1"  # MMAP=0: the weights read into the process's memory
    llm = llama_cpp.Llama(path, n_ctx=2048, n_threads=1, n_batch=512, verbose=False, use_mmap=mmap)
    phase("model loaded (n_ctx 2048)")
    llm.create_completion("The capital of France is", max_tokens=16, temperature=0)
    phase("16 tokens decoded")
    table(f"llama.cpp {llama_cpp.__version__} (use_mmap={mmap})")
    sys.exit()

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
if w == "baseline":
    from slimlm.model.config import ModelConfig
    from slimlm.model.gguf import _read_tokenizer
    from slimlm.model.gguf_file import GGUFFile
    from slimlm.model.hub import DEFAULT_MODEL, KNOWN_MODELS, LoadedModel, package_file
    path = package_file(KNOWN_MODELS[DEFAULT_MODEL])
    f = GGUFFile(path)
    tok = _read_tokenizer(f, path)
    g = lambda k: int(f.fields[f"llama.{k}"])  # noqa: E731
    cfg = ModelConfig(model_type="llama", vocab_size=256, hidden_size=g("embedding_length"), intermediate_size=64,
                      num_layers=1, num_heads=g("attention.head_count"), num_kv_heads=g("attention.head_count_kv"),
                      tie_word_embeddings=True)
    del f
    phase("tokenizer")
    from slimlm.model.transformer import CausalLM
    lm = LoadedModel(CausalLM(cfg).eval(), tok, path, {}, weights="dense")
else:
    lm = load("smollm2-135m-instruct", "float32", weights=w)
phase("model loaded")
pb = packed_bytes(lm.model)

llm = LLM(lm, kv_cache_bytes="16M")
phase("engine built (16 MB KV)")
prompt = "The capital of France is"
bench = os.environ.get("PROMPT") == "bench"  # bench decode's workload: a warm-up, then a 64-token prompt
if bench:
    from slimlm.bench.workloads import text_prompt
    warm, prompt = text_prompt(lm.tokenizer, 16, offset=20_000), text_prompt(lm.tokenizer, 64)
if w == "baseline":  # the same prompt length, in the small vocabulary (decoding still detokenizes)
    prompt = [t % 256 for t in (prompt if bench else lm.tokenizer.encode(prompt))]
    warm = [t % 256 for t in warm] if bench else None
if bench:
    llm.generate([warm], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    phase("warm-up: 16-token prompt, 4 tokens")
llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
phase(f"{'64-token prompt, ' if bench else ''}16 tokens decoded")
if os.environ.get("TRIM") == "1":  # a probe: how much of the RSS is freed heap glibc still holds
    from slimlm.model.weights import release_freed_heap
    release_freed_heap()
    phase("after malloc_trim (probe)")
table(f"weights {w}: model tensors (packed + norms) {pb / 2**20:.1f} MiB")
