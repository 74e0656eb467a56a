"""The batching engine gives exactly the reference decoder's (and transformers') greedy outputs
under every scheduling setting, samples reproducibly, and returns every KV block."""

from __future__ import annotations

import random

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.reference import ReferenceDecoder
from slimlm.model.hub import load

MAX_NEW = 16


def make_prompts(n: int = 32, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, 380) for _ in range(40)]  # shared by half the prompts
    sub = [rng.randrange(3, 380) for _ in range(20)]  # deeper shared prefix for some
    prompts = []
    for i in range(n):
        body = [rng.randrange(3, 380) for _ in range(rng.randrange(1, 90))]
        if i % 2 == 0:
            prompts.append(system + (sub if i % 4 == 0 else []) + body)
        else:
            prompts.append(body)
    return prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


@pytest.fixture(scope="module")
def expected(tiny, prompts, tiny_llama_dir):
    """Greedy continuations from the reference decoder, checked against transformers."""
    import transformers

    dec = ReferenceDecoder(tiny.model, tiny.stop_token_ids())
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    outs = []
    for p in prompts:
        ours = [e.token_id for e in dec.stream(p, SamplingParams(temperature=0, max_tokens=MAX_NEW))]
        ids = torch.tensor([p])
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                              eos_token_id=tiny.stop_token_ids(), pad_token_id=0)[0, len(p):].tolist()
        assert ours == theirs[: len(ours)] and len(ours) == len(theirs)
        outs.append(ours)
    return outs


SETTINGS = {
    "chunk16-block8": dict(max_num_batched_tokens=16, block_size=8),
    "chunk16-block16": dict(max_num_batched_tokens=16, block_size=16),
    "chunk64-block8": dict(max_num_batched_tokens=64, block_size=8),
    "chunk64-block16": dict(max_num_batched_tokens=64, block_size=16),
    "chunk512-block8": dict(max_num_batched_tokens=512, block_size=8),
    "chunk512-block16": dict(max_num_batched_tokens=512, block_size=16),
    "no-prefix-cache": dict(max_num_batched_tokens=64, enable_prefix_caching=False),
    "no-batchllm": dict(max_num_batched_tokens=64, batch_prefix_scheduling=False),
    "no-cache-no-batchllm": dict(max_num_batched_tokens=512, enable_prefix_caching=False,
                                 batch_prefix_scheduling=False),
    "pytorch-decode-path": dict(max_num_batched_tokens=64, native_kernels=False),
    "default-budget": dict(),
}


def block_bytes(lm, block_size):
    c = lm.model.cfg
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * 4


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_greedy_identical_to_reference(tiny, prompts, expected, name):
    cfg = SETTINGS[name]
    llm = LLM(tiny, kv_cache_bytes=400 * block_bytes(tiny, cfg.get("block_size", 16)), **cfg)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.prompt_token_ids for o in outs] == prompts
    eng = llm.engine
    assert eng.pool.num_used() == 0 or eng.pool.num_free() == eng.pool.num_blocks
    assert all(r == 0 for r in eng.pool.ref_count)
    if cfg.get("enable_prefix_caching", True):
        assert eng.stats["computed_prompt_tokens"] < sum(map(len, prompts))  # the shared prefix was reused


def test_preemption_under_a_tight_kv_budget(tiny, prompts, expected):
    # 30 blocks of 8 tokens: far less than 32 prompts need at once, more than the largest one
    llm = LLM(tiny, block_size=8, max_num_batched_tokens=64, kv_cache_bytes=30 * block_bytes(tiny, 8))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_waiting_sequences_never_stall_a_pool_of_one_sequence(tiny):
    """9 blocks of 8 tokens, each request needing 7 (40 prompt + 12 new tokens), prompts sharing a
    prefix: preempted sequences come back matching their own cached blocks. A waiting sequence
    that failed admission used to keep the blocks it matched, so two waiting sequences could hold
    the whole pool between them with nothing running: the engine stepped forever (found by kv14).
    Now every request finishes, with the roomy engine's tokens."""
    qs = [p[:40] for p in make_prompts(6, seed=2)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(tiny, block_size=8).generate(qs, sp, use_tqdm=False)]
    eng = LLM(tiny, block_size=8, max_num_batched_tokens=64, kv_cache_bytes=9 * block_bytes(tiny, 8)).engine
    ids = [eng.add_request(q, sp) for q in qs]
    got: dict = {}
    for _ in range(1000):  # ~70 steps when it works
        if not eng.has_unfinished():
            break
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.outputs[0].token_ids
    assert not eng.has_unfinished(), "the engine stalled with requests waiting"
    assert eng.scheduler.num_preemptions > 0
    assert [got[i] for i in ids] == want
    assert eng.pool.num_free() == eng.pool.num_blocks


def test_text_outputs_and_finish_reasons(tiny, prompts, expected):
    llm = LLM(tiny)
    outs = llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    for o, exp in zip(outs, expected):
        c = o.outputs[0]
        assert c.text == tiny.tokenizer.decode(exp)
        assert c.finish_reason == ("stop" if exp[-1] in tiny.stop_token_ids() else "length")


def test_seeded_sampling_independent_of_batch(tiny, prompts):
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12)
    alone = LLM(tiny).generate([prompts[3]], p, use_tqdm=False)[0].outputs[0].token_ids
    mixed = LLM(tiny, max_num_batched_tokens=32).generate(
        prompts[:8], [SamplingParams(temperature=1.0, max_tokens=12)] * 3 + [p] + [SamplingParams(max_tokens=5)] * 4,
        use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone


def test_n_samples_share_the_prompt_kv(tiny, prompts):
    llm = LLM(tiny, block_size=8)
    p = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=8)
    out = llm.generate([prompts[0]], p, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # the prompt was computed once, not four times
    assert llm.engine.stats["computed_prompt_tokens"] == len(prompts[0])
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    # each sample equals the same seeded sample drawn alone (seed + index)
    again = LLM(tiny).generate([prompts[0]], p, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_stop_strings_and_logprobs(tiny, prompts, expected):
    llm = LLM(tiny)
    full = tiny.tokenizer.decode(expected[5])
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("degenerate text")
    out = llm.generate([prompts[5]], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop=[stop], logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.logprobs) == len(out.token_ids)
    assert all(len(d) >= 3 and t in d for d, t in zip(out.logprobs, out.token_ids))


def test_abort_frees_blocks(tiny, prompts):
    llm = LLM(tiny)
    eng = llm.engine
    ids = [eng.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in prompts[:6]]
    for _ in range(3):
        eng.step()
    assert eng.pool.num_used() > 0
    for rid in ids:
        eng.abort(rid)
    assert not eng.has_unfinished()
    assert all(r == 0 for r in eng.pool.ref_count)


@pytest.mark.parametrize("bad,param", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_params_raise_before_anything_runs(bad, param):
    with pytest.raises(ValueError, match=param):
        SamplingParams(**bad)


def test_bad_prompt_in_batch_raises_before_running(tiny, prompts):
    llm = LLM(tiny)
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        llm.generate([prompts[0], [], prompts[1]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="context"):
        llm.generate([prompts[0], [5] * 300], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.stats["steps"] == 0
    # the engine still works afterwards
    assert llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)


def test_prompt_logprobs_match_a_dense_forward(tiny, prompts):
    llm = LLM(tiny, max_num_batched_tokens=16, block_size=8)  # several chunks per prompt
    p = prompts[0]
    llm.generate([p], SamplingParams(max_tokens=1), use_tqdm=False)  # warm the prefix cache
    out = llm.generate([p], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    with torch.no_grad():
        ref = tiny.model(torch.tensor([p]))[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    got = torch.tensor([out.prompt_logprobs[i][p[i]] for i in range(1, len(p))])
    want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
    assert torch.allclose(got, want, atol=1e-4)
    assert all(len(d) >= 2 for d in out.prompt_logprobs[1:])


def test_in_flight_dedup_never_computes_more_than_without_it(tiny):
    """BatchLLM's dedup makes followers wait for the leader's blocks; they must then pick them up
    from the prefix cache (4 prompts sharing 160 tokens, block 8, budget 64)."""
    import random

    rng = random.Random(0)
    shared = [rng.randrange(3, 380) for _ in range(160)]
    prompts = [shared + [rng.randrange(3, 380) for _ in range(20)] for _ in range(4)]
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    computed = {}
    for dedup in (True, False):
        llm = LLM(tiny, block_size=8, max_num_batched_tokens=64, batch_prefix_scheduling=dedup)
        llm.generate(prompts, p, use_tqdm=False)
        computed[dedup] = llm.engine.stats["computed_prompt_tokens"]
    assert computed[True] <= computed[False]
    assert computed[True] <= 160 + 4 * 24  # the shared prefix once, each tail (+ its partial block) once


def test_request_metrics(tiny):
    llm = LLM(tiny, block_size=8)
    out = llm.generate([list(range(3, 60))], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.time_to_first_token >= 0
    # 57 prompt tokens + 9 whose KV was computed = 66 tokens = 9 blocks of 8
    assert m.kv_peak_bytes == 9 * llm.engine.bytes_per_block
