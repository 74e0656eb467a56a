"""KV blocks at peak on the throughput workload (64 mixed prompts, half sharing a 400-token system
prompt, 128 tokens each), full KV vs H2O, and what the H2O peak is made of. Block counts depend
only on token counts and the scheduler (budget, slack, prefix sharing), not on the weights, so a
one-layer random model with the real tokenizer's prompts gives the real model's counts in about
a minute: deterministic, no quiet machine needed.

PYTHONPATH=src python docs/results/raw/kv_peak_blocks.py ["{'block_slack': 1}" ...]
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, ".")
from slimlm import LLM, SamplingParams  # noqa: E402
from slimlm.bench.workloads import mixed_prompts  # noqa: E402
from slimlm.model.hub import load  # noqa: E402
from tests.conftest import make_hf_model  # noqa: E402

torch.set_num_threads(1)
tok = LLM("smollm2-135m-instruct", kv_cache_bytes="8M").engine.tokenizer
prompts = mixed_prompts(tok, n=64, seed=0)
d = Path(tempfile.mkdtemp())
make_hf_model(d, "llama", vocab_size=49152, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=1, intermediate_size=64, max_position_embeddings=4096)
lm = load(d)
params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
configs = [("full", {}), ("full, no prefix caching", {"enable_prefix_caching": False}),
           ("h2o 0.2", {"kv_policy": "h2o", "kv_policy_args": {"budget": 0.2}})]
configs += [(f"h2o 0.2 {a}", {"kv_policy": "h2o", "kv_policy_args": {"budget": 0.2, **eval(a)}}) for a in sys.argv[1:]]
for name, kw in configs:
    eng = LLM(lm, kv_cache_bytes="2G", **kw).engine
    for p in prompts:
        eng.add_request(p, params)
    peak, at = 0, None
    while eng.has_unfinished():
        eng.step()
        if eng.pool.num_used() > peak:
            peak = eng.pool.num_used()
            rows = [(s.num_computed < s.prompt_len, len(eng.kv.held_blocks(s.seq_id)),
                     -(-(eng.policy.budget(s.num_computed) if eng.policy else s.num_stored) // eng.kv.block_size))
                    for s in eng.scheduler.running]
            at = (eng.stats["steps"], rows)
    pre, dec = [r for r in at[1] if r[0]], [r for r in at[1] if not r[0]]
    print(f"{name}: peak {peak} blocks (step {at[0]}): {len(dec)} decoding hold {sum(r[1] for r in dec)} "
          f"(their budgets' blocks: {sum(r[2] for r in dec)}), {len(pre)} in prefill hold {sum(r[1] for r in pre)}",
          flush=True)
