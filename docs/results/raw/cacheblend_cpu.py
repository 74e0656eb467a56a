"""CacheBlend vs flat prompts (prefix caching) per warm RAG prompt, in one process: CPU seconds of
`LLM.generate` (max_tokens=1) and the blend's phases, on `slimlm eval rag`'s passages (seed 0).
Usage (repo root): PYTHONPATH=src python docs/results/raw/cacheblend_cpu.py RATIO PASSAGE_TOKENS [N] [--prof]
(--prof: a torch profile of one blended prompt). CPU time, not wall time: comparable on a loaded machine."""
import torch, random, sys, time
torch.set_num_threads(1)
from slimlm import LLM, SamplingParams
from slimlm.eval.rag import INTRO, FACT, QUESTION, NAMES
from slimlm.eval.needle import filler_ids
ratio = float(sys.argv[1]); PT = int(sys.argv[2]) if len(sys.argv) > 2 else 150
flat_llm = LLM("smollm2-135m-instruct")
tok = flat_llm.engine.tokenizer
text = tok.decode(filler_ids("essays", tok)); words = text.split()
rng = random.Random(0)
passages, facts = [], []
for i in range(8):
    name, code = NAMES[i], str(rng.randint(10000, 99999))
    span = max(400, 2 * PT)
    start = rng.randrange(len(words) - span)
    ids = tok.encode(" ".join(words[start:start+span]), add_special_tokens=False)[:PT]
    half = tok.decode(ids[:len(ids)//2]), tok.decode(ids[len(ids)//2:])
    passages.append(half[0] + FACT.format(name=name, code=code) + half[1] + "\n\n"); facts.append((name, code))
qs = []
for q in range(6):
    picked = rng.sample(range(8), 4); target = rng.choice(picked); qs.append((picked, QUESTION.format(name=facts[target][0])))
blend_llm = LLM("smollm2-135m-instruct", blend_recompute_ratio=ratio)
sp = SamplingParams(temperature=0, max_tokens=1)
# warm: all passages into the store
for i in range(0, 8, 4):
    blend_llm.generate([{"segments": [INTRO] + [{"chunk": passages[j]} for j in range(i, i+4)] + ["x"]}], sp, use_tqdm=False)
flat_llm.generate([INTRO + passages[0]], sp, use_tqdm=False)
print("dtype", blend_llm.engine.model.dtype)
ft, bt = [], []
for picked, question in qs[:int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 6]:
    flat = INTRO + "".join(passages[i] for i in picked) + question
    seg = {"segments": [INTRO] + [{"chunk": passages[i]} for i in picked] + [question]}
    c0 = dict(blend_llm.engine.blender.stats["cpu_s"])
    c = time.process_time(); o = blend_llm.generate([seg], sp, use_tqdm=False)[0]; bt.append(time.process_time() - c)
    c1 = blend_llm.engine.blender.stats["cpu_s"]
    c = time.process_time(); f = flat_llm.generate([flat], sp, use_tqdm=False)[0]; ft.append(time.process_time() - c)
    print(f"T={len(o.prompt_token_ids)} [CPU s] blend {bt[-1]:.3f}s flat {ft[-1]:.3f}s phases", {k: round(c1[k]-c0[k], 4) for k in c1})
print(f"mean blend {sum(bt)/len(bt):.3f} flat {sum(ft)/len(ft):.3f} ratio flat/blend {sum(ft)/sum(bt):.2f}")
if "--prof" in sys.argv:
    from torch.profiler import profile
    picked, question = qs[0]
    seg = {"segments": [INTRO] + [{"chunk": passages[i]} for i in picked] + [question]}
    with profile() as p:
        blend_llm.generate([seg], sp, use_tqdm=False)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
