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
    """Two requests sharing a 128-token document with 12-token questions (prefix 128 = the
    document for both: they factor the same blocks), and one unrelated request; lengths such that
    no prefix grows within 12 decoded tokens (the tier freezes a row's prefix at its factored
    length, ShadowKV without it would re-summarize a grown prefix). (A request whose
    prefix is shorter or longer than a shared factored one reads those keys rebuilt, so its tokens
    may differ from ShadowKV's without the tier: the tier's approximation, not tested as equal.)"""
    base = make_prompts(8, seed=5)
    doc = ((base[0] + base[2] + base[4]) * 2)[:128]
    return [doc + (base[1] * 4)[:12], doc + (base[3] * 4)[:12], (base[5] * 4)[:40]]


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


def test_preemption_with_the_second_tier_gives_the_same_tokens(tiny):
    """A pool too small for the batch: sequences are preempted and recomputed (prefix caching off,
    so a recomputed prompt is computed from its tokens again, not read back rebuilt)."""
    prompts = prompts_same_prefix_len()[:2]
    fixed = {"prefix": 128}  # the tier freezes a row's prefix at its factored length; so does this
    ref, ref_eng = run(tiny, prompts, {**ARGS["shadowkv"], **fixed}, max_tokens=12, block_size=8)
    bpb = ref_eng.bytes_per_block  # the same spec with or without the tier
    out, eng = run(tiny, prompts, {**TIER, **fixed}, max_tokens=12, block_size=8, enable_prefix_caching=False,
                   max_num_batched_tokens=32, kv_cache_bytes=32 * bpb)
    assert eng.scheduler.num_preemptions > 0 and eng.pool.tier.stats["key_blocks_given_back"] > 0
    assert out == ref
    assert eng.pool.num_used() == 0 and eng.pool.tier.num_used() == 0 and eng.kv_bytes_in_use() == 0


def test_key_bytes_held_drop_by_the_factored_blocks(tiny):
    """One request with a long prompt: after its first decode steps the prefix's P / 8 blocks
    hold values only; bytes in use = value blocks + key blocks + the factors, exactly."""
    prompt = prompts_same_prefix_len()[0]
    P = (len(prompt) - TIER["recent"]) // TIER["granule"] * TIER["granule"]  # the prefix at the first decode
    n = P // 8
    llm = LLM(tiny, kv_policy="shadowkv", kv_policy_args=TIER, block_size=8)
    eng = llm.engine
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for _ in range(4):  # prefill, then decode steps (factoring happens at a step's start)
        eng.step()
    pool, tier, cfg = eng.pool, eng.pool.tier, tiny.model.cfg
    used = pool.num_used()
    assert n >= 12 and tier.stats["key_blocks_given_back"] == n and pool.key_blocks_in_use() == used - n
    H, d, r, c = cfg.num_kv_heads, cfg.head_dim, TIER["rank"], TIER["chunk"]
    outliers = int(TIER["outliers"] * P // c) * c
    factors = cfg.num_layers * H * 4 * (P * r + r * d + P // c * d + outliers * d)  # float32 A, B, landmarks
    assert tier.record_bytes == factors
    half = eng.bytes_per_block // 2
    assert eng.kv_bytes_in_use() == (2 * used - n) * half + factors
    while eng.has_unfinished():
        eng.step()
    assert pool.num_used() == 0 and pool.key_blocks_in_use() == 0


def test_a_later_prefill_over_a_factored_prefix_reads_rebuilt_keys(tiny):
    """Blocks whose keys were given back are read rebuilt: RoPE_t(A[t] B), outlier chunks exact."""
    prompt = prompts_same_prefix_len()[0]
    llm = LLM(tiny, kv_policy="shadowkv", kv_policy_args=TIER, block_size=8)
    eng = llm.engine
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    for _ in range(3):
        eng.step()
    (b, (rec, i)), *_ = sorted(eng.pool.tier.factored.items(), key=lambda x: x[1][1])
    assert i == 0
    from slimlm.model.rope import apply_rope

    A, B = rec.summaries[1][0], rec.summaries[1][1]
    cos, sin = tiny.model.rotary(torch.arange(8)[None], torch.float32)
    want = apply_rope(torch.bmm(A[:, :8], B)[None], cos, sin)[0].transpose(0, 1)  # (8, H, d)
    rows, keys = rec.outlier_rows[1], rec.outlier_keys[1]
    for h in range(want.shape[1]):
        for j in (rows[h] < 8).nonzero()[:, 0].tolist():
            want[rows[h, j], h] = keys[h, j]
    got = eng.cache.gather("k", 1, torch.tensor([b]))[0]
    torch.testing.assert_close(got.float(), want)
    # a second request over the same document prefills against those rebuilt keys and finishes
    out = llm.generate([prompt[:130] + [3, 4]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and eng.stats["computed_prompt_tokens"] < eng.stats["prompt_tokens"]


def test_pool_counts_key_blocks_and_recycles_cached_ones():
    pool = BlockPool(8, 4)
    tier = KeyTier(8, 4)
    pool.tier, tier.ref_count = tier, pool.ref_count
    assert pool.num_free() == 4 and pool.capacity == 4  # bounded by the key blocks
    held = [pool.allocate() for _ in range(4)]
    assert pool.num_free() == 0 and tier.num_used() == 4
    rec = Factored(("blocks", 12, tuple(held[:3])), tuple(held[:3]), [], [], [], None)
    assert tier.factor(rec) == 3 and tier.record(rec.key) is rec
    assert pool.num_free() == 3 and pool.key_blocks_in_use() == 1
    more = [pool.allocate() for _ in range(3)]
    assert pool.num_free() == 0 and tier.num_used() == 4
    # a cached block keeps its key while unreferenced; the pool recycles it when keys run short
    pool.register(more[0], b"k0")
    pool.free(more[0])
    assert pool.num_free() == 1 and pool.key_blocks_in_use() == 3
    b = pool.allocate()
    assert tier.has_key(b) and not pool.is_cached(b"k0")
    pool.free(held[0])  # a factored block freed uncached: its record no longer serves lookups
    assert tier.record(rec.key) is None and held[0] not in tier.factored
    for x in held[1:] + more[1:] + [b]:
        pool.free(x)
    assert pool.num_used() == 0 and tier.num_used() == 0 and not tier.factored and tier.record_bytes == 0


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_second_tier_composes_with_quantized_kv(tiny, codec):
    prompts = prompts_same_prefix_len()[:2]
    kw = dict(block_size=8, kv_cache_dtype=codec, max_tokens=6)
    ref, _ = run(tiny, prompts, ARGS["shadowkv"], **kw)
    out, eng = run(tiny, prompts, TIER, **kw)
    assert out == ref
    # the prefix is factored on the native sparse decode path; a format it cannot read decodes
    # through PyTorch with every key held (the tier then frees nothing)
    assert (eng.pool.tier.stats["key_blocks_given_back"] > 0) == (eng.runner.paths.sparse_native is not None)
    assert eng.pool.num_used() == 0 and eng.pool.key_blocks_in_use() == 0


def test_int4_tier_counts_key_and_value_blocks_at_their_own_bytes(tmp_path):
    """int4 at head size 64 stores a key head in 48 bytes (groups of 16) and a value head in 40
    (groups of 32): the pool is sized and the bytes held are counted with each at its own size,
    not as halves of a block."""
    from tests.conftest import make_hf_model

    make_hf_model(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    lm = load(tmp_path)
    c = lm.model.cfg
    kb, vb = c.num_layers * 8 * c.num_kv_heads * 48, c.num_layers * 8 * c.num_kv_heads * 40
    llm = LLM(lm, kv_policy="shadowkv", kv_policy_args=TIER, kv_cache_dtype="int4", block_size=8,
              kv_cache_bytes=int(100 * (vb + TIER["key_share"] * kb)))
    eng = llm.engine
    pool, tier = eng.pool, eng.pool.tier
    assert pool.num_blocks == 100 and tier.num_key_blocks == 50  # halves of a block would make it 96
    assert (tier.key_block_bytes, tier.value_block_bytes) == (kb, vb) and eng.bytes_per_block == kb + vb
    eng.add_request(prompts_same_prefix_len()[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for _ in range(4):  # prefill, then decode steps: the prefix's blocks give their keys back
        eng.step()
    used, keyed = pool.num_used(), pool.key_blocks_in_use()
    assert tier.stats["key_blocks_given_back"] > 0 and 0 < keyed < used and tier.record_bytes > 0
    assert eng.kv_bytes_in_use() == used * vb + keyed * kb + tier.record_bytes
    while eng.has_unfinished():
        eng.step()
    pool.reset_prefix_cache()
    assert eng.kv_bytes_in_use() == 0
