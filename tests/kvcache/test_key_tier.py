"""ShadowKV's second tier (kvcache/key_tier.py): a factored prefix gives its key blocks back to
the pool, memory held drops by what the arithmetic says, and decoding is unchanged: the same
greedy tokens as ShadowKV without the tier (batched, chunked, prefix caching on / off,
preemption); the pool (values and keys) returns to zero."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.kvcache.block_pool import BlockPool
from slimlm.kvcache.key_tier import Factored, KeyTier
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts
from tests.kvcache.test_query_policies import ARGS


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


TIER = {**ARGS["shadowkv"], "key_share": 0.5}


def prompts_same_prefix_len():
    """Two requests sharing a document with questions of one length (so one prefix length: no
    request reads another's factored prefix densely), and one unrelated request."""
    base = make_prompts(8, seed=5)
    doc = (base[0] + base[2] + base[4])[:120]
    return [doc + base[1][:20], doc + base[3][:20], base[5][:50]]


def run(tiny, prompts, args, max_tokens=8, **kw):
    llm = LLM(tiny, kv_policy="shadowkv", kv_policy_args=args, **kw)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.engine


@pytest.mark.parametrize("chunk,block,caching", [(16, 8, True), (64, 16, False)])
def test_second_tier_decodes_as_shadowkv_and_gives_key_blocks_back(tiny, chunk, block, caching):
    prompts = prompts_same_prefix_len()
    kw = dict(max_num_batched_tokens=chunk, block_size=block, enable_prefix_caching=caching)
    ref, _ = run(tiny, prompts, ARGS["shadowkv"], **kw)
    out, eng = run(tiny, prompts, TIER, **kw)
    assert out == ref
    tier = eng.pool.tier
    assert tier.stats["key_blocks_given_back"] > 0
    assert eng.pool.num_used() == 0 and eng.pool.key_blocks_in_use() == 0
    eng.pool.reset_prefix_cache()  # cached prefixes keep their factors until their blocks are recycled
    assert eng.kv_bytes_in_use() == 0 and tier.num_used() == 0 and not tier.factored and not tier.records
