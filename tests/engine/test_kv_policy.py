"""KV-cache policies: every registered policy runs in the engine; the sink policy (LM-Infinite)
equals a dense reference of its attention pattern and keeps memory bounded."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.paged_attention import capped_attention
from slimlm.kvcache.policy import KV_POLICIES
from slimlm.model.attention import attention
from slimlm.model.hub import load
from slimlm.model.rope import apply_rope
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


class LambdaDense:
    """Dense reference: every key kept, LM-Infinite's Λ mask and distance ceiling applied
    by rotating unrotated q/k explicitly at the capped distance."""

    def __init__(self, model, positions, sink, window, cap):
        self.model, self.pos, self.sink, self.window, self.cap = model, positions, sink, window, cap

    def attend(self, layer, q, k, v):
        p = self.pos[0]
        T = p.shape[0]
        qp, kp = p[:, None], p[None, :]
        mask = (kp <= qp) & ((qp - kp < self.window) | (kp < self.sink))
        dist = (qp - kp).clamp(max=self.cap)  # (T, T)
        rot = self.model.rotary
        cq, sq = rot(-self.pos, q.dtype)
        ck, sk = rot(-self.pos, q.dtype)
        qu, ku = apply_rope(q, cq, sq), apply_rope(k, ck, sk)  # unrotated
        G = q.shape[1] // k.shape[1]
        ku, vx = ku.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        scores = torch.empty(1, q.shape[1], T, T)
        for i in range(T):  # score(i, j) = <R(dist_ij) q_u_i, k_u_j>
            c, s = rot(dist[i][None], q.dtype)  # (1, T, d)
            qi = qu[:, :, i : i + 1].expand(-1, -1, T, -1)
            scores[:, :, i] = (apply_rope(qi, c, s) * ku).sum(-1)
        scores = (scores * self.model.attn_scale).masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ vx


def dense_greedy(lm, prompt, n, sink, window, cap):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            pos = torch.arange(len(ids))[None]
            logits = lm.model(torch.tensor([ids]), pos, LambdaDense(lm.model, pos, sink, window, cap))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("chunk,block", [(16, 8), (64, 16)])
def test_sink_policy_equals_dense_lambda_attention(tiny, chunk, block):
    prompt = make_prompts(4, seed=9)[0][:70] + make_prompts(4, seed=10)[2][:30]
    sink, window = 4, 24
    llm = LLM(tiny, kv_policy="sink", kv_policy_args={"sink": sink, "window": window},
              max_num_batched_tokens=chunk, block_size=block)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == dense_greedy(tiny, prompt, 8, sink, window, window)
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_sink_policy_bounds_memory_beyond_the_context(tiny):
    prompt = (make_prompts(32, seed=4)[0] * 20)[:900]  # 3.5x the model's 256-token context
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(tiny, kv_policy="sink", kv_policy_args={"sink": 4, "window": 64}, block_size=8,
              max_num_batched_tokens=32)
    eng = llm.engine
    rid = eng.add_request(prompt, params)
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.pool.num_used())
    bound = eng.policy.max_blocks(32, 8)
    assert peak <= bound < len(prompt) // 8
    assert rid not in eng.requests and eng.pool.num_free() == eng.pool.num_blocks
    with pytest.raises(ValueError, match="context"):
        LLM(tiny).generate([prompt], params, use_tqdm=False)


def test_capped_attention_is_attention_when_nothing_is_far(tiny):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    qp = torch.tensor([[7, 8, 9]] * 2)
    kp = torch.arange(10).expand(2, 10)
    mask = (kp[:, None] <= qp[:, :, None])[:, None]
    got = capped_attention(q, k, v, mask, qp, kp, 100, tiny.model.rotary, 0.25)
    assert torch.allclose(got, attention(q, k, v, mask, 0.25), atol=1e-5)


POLICY_ARGS = {"minicache": {"start": 0},  # the tiny model has 2 layers: merge them
               "shadowkv": {"rank": 4}}  # below its head size (16)


@pytest.mark.parametrize("codec", ["auto", "int8", "int4"])
@pytest.mark.parametrize("name", KV_POLICIES.names())
def test_every_policy_runs_in_the_engine(tiny, name, codec):
    """Every policy with every kind of codec: batched, with prefix caching, and under preemption
    (a pool of 24 blocks for 6 prompts of up to 20 blocks); the pool is empty afterwards."""
    prompts = make_prompts(6, seed=2)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kw = dict(kv_policy=name, kv_policy_args=POLICY_ARGS.get(name, {}), kv_cache_dtype=codec,
              max_num_batched_tokens=32, block_size=8)
    llm = LLM(tiny, **kw)
    bpb = llm.engine.bytes_per_block
    runs = {"batched": llm, "preempted": LLM(tiny, kv_cache_bytes=24 * bpb, enable_prefix_caching=False, **kw)}
    for run, engine_llm in runs.items():
        outs = engine_llm.generate(prompts, params, use_tqdm=False)
        eng = engine_llm.engine
        assert all(len(o.outputs[0].token_ids) == 6 for o in outs), run
        assert eng.pool.num_free() == eng.pool.num_blocks, run
    pre = runs["preempted"].engine
    assert pre.scheduler.num_preemptions > 0 or pre.policy.granularity == "token"  # h2o keeps 20%: no pressure
    eng = runs["batched"].engine
    if eng.pool.enable_prefix_caching:  # token policies switch it off (compacted blocks hold no prefix)
        assert eng.stats["computed_prompt_tokens"] < eng.stats["prompt_tokens"]
