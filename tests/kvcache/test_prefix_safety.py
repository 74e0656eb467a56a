"""The prefix cache cannot be poisoned: keys are sha256 chains, a hit needs equal tokens, salts
separate tenants; and one request's failure (sampling, construction) never touches the others."""

from __future__ import annotations

import hashlib
import random
from array import array

import pytest

from slimlm import SamplingParams
from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import LLMEngine
from slimlm.kvcache import manager as manager_mod
from slimlm.kvcache.block_pool import BlockPool, block_contents, block_hashes
from slimlm.model.hub import load

B = 16


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


def engine(tiny, **kw) -> LLMEngine:
    return LLMEngine(tiny, EngineConfig(kv_cache_bytes=4 << 20, **kw))


def run(eng: LLMEngine) -> dict:
    outs = {}
    for _ in range(10_000):
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        if not eng.has_unfinished():
            break
    return outs


def greedy_alone(tiny, prompt, max_tokens=8) -> list[int]:
    eng = engine(tiny, enable_prefix_caching=False)
    rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    return run(eng)[rid].outputs[0].token_ids


def test_block_keys_are_a_sha256_chain():
    rng = random.Random(0)
    toks = [rng.randrange(384) for _ in range(3 * B + 5)]
    keys = block_hashes(toks, B)
    assert len(keys) == 3 and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    h = b""
    for i, k in enumerate(keys):  # k_i = sha256(len(k_{i-1}) || k_{i-1} || tokens_i as int64)
        h = hashlib.sha256(bytes([len(h)]) + h + array("q", toks[i * B:(i + 1) * B]).tobytes()).digest()
        assert k == h
    other = list(toks)
    other[0] += 1
    assert all(a != b for a, b in zip(block_hashes(other, B), keys))  # a change anywhere changes every later key
    assert block_hashes(toks, B, salt="a") != keys != block_hashes(toks, B, salt="b")
    assert block_hashes(toks[B:], B, parent=keys[0]) == keys[1:]  # incremental = from scratch


def test_equal_keys_with_different_tokens_never_share():
    pool = BlockPool(8, B)
    a, b = [1] * B, [2] * B
    key = b"\0" * 32  # pretend a collision
    blk = pool.allocate()
    pool.register(blk, key, block_contents(a, B, [key])[0])
    assert pool.lookup(key, block_contents(b, B, [key])[0]) is None
    assert not pool.is_cached(key, block_contents(b, B, [key])[0])
    assert pool.lookup(key, block_contents(a, B, [key])[0]) == blk


def test_colliding_keys_in_the_engine_give_each_request_its_own_kv(tiny, monkeypatch):
    """Every block gets the same keys (a forced collision): the second prompt must still get
    its own KV (same greedy output as alone), never the first one's."""
    rng = random.Random(1)
    p1 = [rng.randrange(3, 380) for _ in range(3 * B + 3)]
    p2 = [rng.randrange(3, 380) for _ in range(3 * B + 3)]
    ref2 = greedy_alone(tiny, p2)

    def colliding(token_ids, block_size, parent=None, salt=None):
        return [b"same-key-%d" % i for i in range(len(token_ids) // block_size)]

    monkeypatch.setattr(manager_mod, "block_hashes", colliding)
    eng = engine(tiny)
    eng.add_request(p1, SamplingParams(temperature=0, max_tokens=8))
    run(eng)
    rid = eng.add_request(p2, SamplingParams(temperature=0, max_tokens=8))
    out = run(eng)[rid]
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == ref2
    assert eng.pool.num_used() == 0


def test_prefix_hits_still_work_and_salts_separate_them(tiny):
    rng = random.Random(2)
    p = [rng.randrange(3, 380) for _ in range(4 * B + 2)]
    ref = greedy_alone(tiny, p)
    eng = engine(tiny)
    got = {}
    for salt in [None, None, "tenant-a", "tenant-b", "tenant-a"]:
        rid = eng.add_request(p, SamplingParams(temperature=0, max_tokens=8, cache_salt=salt))
        o = run(eng)[rid]
        assert o.outputs[0].token_ids == ref
        got.setdefault(salt, []).append(o.num_cached_tokens)
    assert got[None] == [0, 4 * B]  # the unsalted cache is shared
    assert got["tenant-a"] == [0, 4 * B]  # a salt shares with itself ...
    assert got["tenant-b"] == [0]  # ... and with no other salt
    assert eng.pool.num_used() == 0 and not eng.kv.salts


# ---------------------------------------------------------------------- failure isolation
@pytest.mark.parametrize("poison", [  # these reached engine.step() and failed every request in it
    dict(temperature=1.0, repetition_penalty=1e-300),
    dict(temperature=1.0, top_k=1180591620717411303424),
    dict(temperature=1.0, n=2, seed=18446744073709551615),
    dict(temperature=float("inf")),
    dict(temperature=1e9),
])
def test_poisoned_params_are_refused_at_the_boundary(tiny, poison):
    with pytest.raises(ValueError):
        engine(tiny).add_request([5, 6, 7], SamplingParams(max_tokens=4, **poison))


def test_a_vanishing_temperature_is_greedy(tiny):
    """temperature=1e-300 divided the logits into inf; below 1e-5 it is greedy (as vLLM)."""
    eng = engine(tiny)
    rid = eng.add_request([5, 6, 7, 8], SamplingParams(temperature=1e-300, max_tokens=6))
    assert run(eng)[rid].outputs[0].token_ids == greedy_alone(tiny, [5, 6, 7, 8], 6)


@pytest.mark.parametrize("poison", [dict(temperature=float("nan")), dict(repetition_penalty=1e-300)])
def test_a_request_whose_sampling_fails_fails_alone(tiny, poison):
    """Params that slip past validation (set after construction) make sampling fail: only that
    request fails; three others, sampled and greedy, produce exactly what they do alone."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 380) for _ in range(rng.randrange(5, 40))] for _ in range(4)]
    kinds = [SamplingParams(temperature=0.8, seed=11, max_tokens=10), SamplingParams(temperature=0, max_tokens=10),
             SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=10, n=2)]

    def alone(i):
        e = engine(tiny)
        rid = e.add_request(prompts[i], kinds[i])
        return [o.token_ids for o in run(e)[rid].outputs]

    expected = [alone(i) for i in range(3)]
    eng = engine(tiny)
    bad = SamplingParams(temperature=1.0, max_tokens=10)
    for k, v in poison.items():
        setattr(bad, k, v)
    rids = [eng.add_request(prompts[i], kinds[i]) for i in range(3)]
    bad_rid = eng.add_request(prompts[3], bad)
    outs = run(eng)
    assert outs[bad_rid].error and "sampling failed" in outs[bad_rid].error
    assert [[o.token_ids for o in outs[r].outputs] for r in rids] == expected
    assert all(outs[r].error is None for r in rids)
    assert eng.pool.num_used() == 0 and not eng.requests and not eng.has_unfinished()


def test_a_failed_add_request_stores_nothing(tiny, monkeypatch):
    import slimlm.engine.engine as engine_mod

    eng = engine(tiny)

    class Boom:
        def __init__(self, *a, **k):
            raise RuntimeError("sampler construction failed")

    monkeypatch.setattr(engine_mod, "SequenceSampler", Boom)
    for i in range(3):
        with pytest.raises(RuntimeError):
            eng.add_request([5] * 40, SamplingParams(max_tokens=4), request_id=f"r{i}")
    assert not eng.requests and not eng.has_unfinished() and eng.pool.num_used() == 0


def test_n_counts_in_the_kv_check(tiny):
    eng = engine(tiny)
    one = eng._blocks_needed(40, SamplingParams(max_tokens=100))
    assert eng._blocks_needed(40, SamplingParams(max_tokens=100, n=4)) > 3 * (one - 3)
    big = SamplingParams(max_tokens=200, n=8)
    if eng._blocks_needed(40, big) > eng.pool.num_blocks:
        with pytest.raises(ValueError, match="x n"):
            eng.validate([5] * 40, big)


def test_an_unexpected_sampling_error_fails_only_its_request(tiny, monkeypatch):
    import slimlm.engine.engine as engine_mod

    real = engine_mod.sample_next

    def flaky(logits, samplers):
        if any(s.params.seed == 666 for s in samplers):
            raise RuntimeError("boom")
        return real(logits, samplers)

    monkeypatch.setattr(engine_mod, "sample_next", flaky)
    p = [7, 8, 9, 10, 11]
    eng = engine(tiny)
    good = eng.add_request(p, SamplingParams(temperature=0, max_tokens=6))
    bad = eng.add_request(p, SamplingParams(temperature=1.0, seed=666, max_tokens=6))
    outs = run(eng)
    assert "RuntimeError: boom" in outs[bad].error
    assert outs[good].error is None and outs[good].outputs[0].token_ids == greedy_alone(tiny, p, 6)
    assert eng.pool.num_used() == 0 and not eng.requests
