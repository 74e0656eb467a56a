"""H2O inside continuous batching: its choice of tokens, its memory, and exact agreement with a
dense, unbatched implementation of the same method fed the same chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm import LLM, SamplingParams
from slimlm.errors import SlimLMError
from slimlm.kvcache.policy import KV_POLICIES
from slimlm.kvcache.policy.h2o import H2OPolicy
from slimlm.model.hub import load
from slimlm.model.rope import apply_rope
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


def test_select_keeps_recent_window_and_heaviest_per_head():
    pol = H2OPolicy(budget=6, recent_ratio=0.5, min_tokens=1)
    mass = torch.zeros(1, 2, 12)
    mass[0, 0, [1, 4, 7]] = torch.tensor([5.0, 3.0, 4.0])
    mass[0, 1, [0, 2, 3]] = torch.tensor([1.0, 2.0, 2.5])
    mass[0, :, 9:] = 100.0  # recent tokens are kept anyway, whatever their mass
    keep = pol.select(mass, 12, 6)
    assert keep[0, 0].tolist() == [1, 4, 7, 9, 10, 11]
    assert keep[0, 1].tolist() == [0, 2, 3, 9, 10, 11]
    shared = H2OPolicy(budget=6, recent_ratio=0.5, min_tokens=1, per_head=False).select(mass, 12, 6)
    assert torch.equal(shared[0, 0], shared[0, 1]) and shared[0, 0].tolist() == [1, 4, 7, 9, 10, 11]


def test_pool_keeps_the_neighbours_of_a_chosen_key():
    mass = torch.zeros(1, 1, 12)
    mass[0, 0, 4] = 10.0
    mass[0, 0, 8] = 1.0
    plain = H2OPolicy(budget=3, recent_ratio=0.0, min_tokens=1).select(mass, 12, 3)[0, 0].tolist()
    assert 4 in plain and 8 in plain
    keep = H2OPolicy(budget=3, recent_ratio=0.0, min_tokens=1, pool=3).select(mass, 12, 3)
    assert keep[0, 0].tolist() == [3, 4, 5]


def test_budget_fraction_and_count():
    assert H2OPolicy(budget=0.2, min_tokens=8).budget(100) == 20
    assert H2OPolicy(budget=0.2, min_tokens=32).budget(100) == 32
    assert H2OPolicy(budget=0.2, min_tokens=32).budget(20) == 20
    assert H2OPolicy(budget=50, min_tokens=8).budget(1000) == 50


@pytest.mark.parametrize("args,msg", [({"budget": 0.0}, "in \\(0, 1\\]"), ({"budget": 1.5}, "in \\(0, 1\\]"),
                                      ({"budget": 8}, "below min_tokens"), ({"budget": "x"}, "fraction"),
                                      ({"recent_ratio": 2}, "recent_ratio"), ({"window": -1}, "window"),
                                      ({"window": 1.5}, "window"), ({"pool": 2}, "odd"), ({"pool": 0}, "odd"),
                                      ({"window": 8, "score": "mean"}, "score=sum")])
def test_bad_arguments_are_refused(tiny, args, msg):
    with pytest.raises((ValueError, SlimLMError), match=msg):
        LLM(tiny, kv_policy="h2o", kv_policy_args=args)


class DenseH2O:
    """One sequence, no paging: stored K/V/mass per layer as (Hkv, S, d) tensors, attention by
    explicit softmax, compaction by the policy after every chunk: H2O as the paper writes it,
    fed the same chunks the engine scheduled. Its schedule: with ``schedule="prompt"`` the first
    compaction waits for the prompt's last chunk; ``score="mean"`` divides each key's mass by
    the queries that saw it (positions kept beside K/V); ``window=W``: the chunk that completes
    the prompt sets every key's mass to the attention of its last W queries."""

    def __init__(self, lm, policy, block_size, prompt_len):
        self.lm, self.policy, self.bs, self.prompt_len = lm, policy, block_size, prompt_len
        m = lm.model
        L, H, d = m.cfg.num_layers, m.cfg.num_kv_heads, m.cfg.head_dim
        self.K = [torch.zeros(H, 0, d) for _ in range(L)]
        self.V = [torch.zeros(H, 0, d) for _ in range(L)]
        self.M = [torch.zeros(H, 0) for _ in range(L)]
        self.P = [torch.zeros(H, 0, dtype=torch.long) for _ in range(L)]
        self.seen = 0

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache keeps of a chunk's keys and values (Hkv, T, d): here, exactly them."""
        return k, v

    @torch.no_grad()
    def chunk(self, tokens: list[int]) -> torch.Tensor:
        m = self.lm.model
        cfg = m.cfg
        T, d, G = len(tokens), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        pos = torch.arange(self.seen, self.seen + T)[None]
        h = m.embed(torch.tensor([tokens]))
        cos, sin = m.rotary(pos, h.dtype)
        for i, layer in enumerate(m.model.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = apply_rope(att.q_proj(x).view(1, T, -1, d).transpose(1, 2), cos, sin)[0]  # (Hq, T, d)
            k = apply_rope(att.k_proj(x).view(1, T, -1, d).transpose(1, 2), cos, sin)[0]  # (Hkv, T, d)
            v = att.v_proj(x).view(1, T, -1, d).transpose(1, 2)[0]
            self.layer = i  # the layer ``store`` keeps
            k, v = self.store(k, v)
            K, V = torch.cat([self.K[i], k], 1), torch.cat([self.V[i], v], 1)
            S = K.shape[1]
            mask = torch.ones(T, S, dtype=torch.bool)
            mask[:, S - T:] = torch.ones(T, T, dtype=torch.bool).tril()
            s = (q @ K.repeat_interleave(G, 0).transpose(-1, -2)) * m.attn_scale  # (Hq, T, S)
            p = s.masked_fill(~mask, float("-inf")).softmax(-1)
            out = p @ V.repeat_interleave(G, 0)  # (Hq, T, d)
            W = min(getattr(self.policy, "window", 0), T) if self.seen < self.prompt_len <= self.seen + T else 0
            if W:  # the chunk completes the prompt: its last W queries' attention is every key's score
                self.M[i] = p.view(-1, G, T, S)[:, :, -W:].sum((1, 2))
            else:
                self.M[i] = torch.cat([self.M[i], torch.zeros(K.shape[0], T)], 1) + p.view(-1, G, T, S).sum((1, 2))
            self.K[i], self.V[i] = K, V
            self.P[i] = torch.cat([self.P[i], pos[0].expand(K.shape[0], T)], 1)
            h = h + att.o_proj(out.transpose(0, 1).reshape(1, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.seen += T
        S = self.K[0].shape[1]
        keep = self.policy.budget(self.seen)
        waits = self.policy.schedule == "prompt" and self.seen < self.prompt_len
        if S > keep + self.policy.slack(self.bs) and not waits:
            score = torch.stack(self.M)
            if self.policy.score == "mean":
                score = score / (self.seen - torch.stack(self.P)).float()
            idx = self.policy.select(score, S, keep)  # (L, H, keep)
            for i in range(len(self.K)):
                gi = idx[i]
                self.K[i] = torch.gather(self.K[i], 1, gi[..., None].expand(-1, -1, d))
                self.V[i] = torch.gather(self.V[i], 1, gi[..., None].expand(-1, -1, d))
                self.M[i] = torch.gather(self.M[i], 1, gi)
                self.P[i] = torch.gather(self.P[i], 1, gi)
        return m.head(h[:, -1:])[0, -1]


def assert_reference_follows(ref, prompt, chunks, out):
    """Feed ``ref`` the chunk lengths the engine scheduled for this sequence (greedy: each
    completed chunk's argmax is the next token); its tokens must equal the engine's."""
    ids, pos, got = list(prompt), 0, []
    for n in chunks:
        logits = ref.chunk(ids[pos : pos + n])
        pos += n
        if pos == len(ids):
            ids.append(int(logits.argmax()))
            got.append(ids[-1])
    assert got[: len(out.outputs[0].token_ids)] == out.outputs[0].token_ids


def engine_chunks(llm, prompts, params):
    """Run the engine, recording the chunk lengths each sequence was given."""
    eng = llm.engine
    real = eng.runner.execute
    log: dict[int, list[int]] = {}

    def spy(out):
        for c in out.chunks:
            log.setdefault(c.seq_id, []).append(len(c.token_ids))
        return real(out)

    eng.runner.execute = spy
    rids = [eng.add_request(p, params) for p in prompts]
    outs, peak = {}, 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        peak = max(peak, eng.pool.num_used())
    seq_of = {rid: outs[rid] for rid in rids}
    return [seq_of[r] for r in rids], log, peak


@pytest.mark.parametrize("settings,schedule", [
    (dict(max_num_batched_tokens=16, block_size=8), {}),
    (dict(max_num_batched_tokens=64, block_size=16), {}),
    (dict(max_num_batched_tokens=512, block_size=8, native_kernels=False), {}),
    (dict(max_num_batched_tokens=32, block_size=8), {"score": "mean"}),
    (dict(max_num_batched_tokens=16, block_size=8), {"schedule": "online"}),
    (dict(max_num_batched_tokens=64, block_size=16), {"schedule": "online", "score": "mean"}),
    (dict(max_num_batched_tokens=64, block_size=8), {"window": 8, "recent_ratio": 0.2}),
    (dict(max_num_batched_tokens=16, block_size=8), {"window": 32, "pool": 3}),
    (dict(max_num_batched_tokens=512, block_size=8, native_kernels=False), {"window": 16, "pool": 5}),
    (dict(max_num_batched_tokens=32, block_size=8), {"window": 8, "schedule": "online"})])
def test_engine_equals_dense_h2o_on_the_same_chunks(tiny, settings, schedule):
    prompts = [(p * 3)[:200] for p in make_prompts(5, seed=12)]  # 60-200 tokens
    args = {"budget": 0.3, "min_tokens": 16, **schedule}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(tiny, kv_policy="h2o", kv_policy_args=args, **settings)
    eng = llm.engine
    by_seq_before = set()
    outs, log, peak = engine_chunks(llm, prompts, params)
    assert eng.pool.num_free() == eng.pool.num_blocks
    seq_ids = sorted(log)  # sequences were created in prompt order
    for prompt, out, sid in zip(prompts, outs, seq_ids):
        ref = DenseH2O(tiny, KV_POLICIES.get("h2o")(**args), settings["block_size"], len(prompt))
        assert_reference_follows(ref, prompt, log[sid], out)
    del by_seq_before


def test_memory_is_given_back(tiny):
    """A fixed budget bounds each sequence's blocks whatever its length; the pool's peak
    follows the budget, not the prompts."""
    prompts = [(p * 4)[:200] for p in make_prompts(6, seed=13)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = LLM(tiny, block_size=8, max_num_batched_tokens=32)
    _, _, peak_full = engine_chunks(full, prompts, params)
    h2o = LLM(tiny, kv_policy="h2o", kv_policy_args={"budget": 32, "min_tokens": 16, "schedule": "online"},
              block_size=8, max_num_batched_tokens=32)
    outs, _, peak = engine_chunks(h2o, prompts, params)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    bound = h2o.engine.policy.max_blocks(32, 8)
    assert peak <= len(prompts) * bound < peak_full
    assert max(o.metrics.kv_peak_bytes for o in outs) <= bound * h2o.engine.bytes_per_block
    assert h2o.engine.stats["kv_peak_bytes"] == peak * h2o.engine.bytes_per_block


@pytest.mark.parametrize("codec", ["auto", "int4"])
def test_kv_bytes_held_multiply_codec_and_budget(tiny, codec):
    """int4 + H2O compose in the byte accounting: a block costs the codec's bytes whatever the
    policy (``KVCacheSpec.bytes_per_block``), and each request's peak (``kv_peak_bytes``, counted
    after each step's compaction) is at most its budget + slack + the step's token, in blocks of
    those bytes: the two savings multiply (each prompt is read in one step here; one read over
    several steps is held whole until its last, ``test_prompt_schedule_holds_the_prompt_then_the_budget``)."""
    prompts = [(p * 4)[:200] for p in make_prompts(3, seed=13)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = dict(kv_cache_dtype=codec, block_size=8, max_num_batched_tokens=1024)
    plain = LLM(tiny, **kw).engine
    llm = LLM(tiny, kv_policy="h2o", kv_policy_args={"budget": 0.25, "min_tokens": 16, "window": 8}, **kw)
    eng = llm.engine
    assert eng.bytes_per_block == plain.bytes_per_block == eng.spec.bytes_per_block(8)
    outs, _, peak = engine_chunks(llm, prompts, params)
    assert eng.stats["kv_peak_bytes"] == peak * eng.bytes_per_block
    for o, p in zip(outs, prompts):
        held = -(-(eng.policy.budget(len(p) + 20) + eng.policy.slack(8) + 1) // 8)
        assert 0 < o.metrics.kv_peak_bytes <= held * eng.bytes_per_block
        assert o.metrics.kv_peak_bytes * 3 < -(-(len(p) + 20) // 8) * plain.bytes_per_block


def test_prompt_schedule_holds_the_prompt_then_the_budget(tiny):
    """schedule="prompt": nothing is evicted before a prompt's last chunk; from then on every
    sequence holds at most budget + slack tokens (+ the step's new token), and the pool's peak
    stays below full KV's."""
    prompts = [(p * 4)[:200] for p in make_prompts(6, seed=13)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = LLM(tiny, block_size=8, max_num_batched_tokens=64)
    _, _, peak_full = engine_chunks(full, prompts, params)
    llm = LLM(tiny, kv_policy="h2o", kv_policy_args={"budget": 32, "min_tokens": 16}, block_size=8,
              max_num_batched_tokens=64)
    eng = llm.engine
    assert eng.policy.max_blocks(64, 8) is None  # the prompt is held whole: no fixed bound
    for p in prompts:
        eng.add_request(p, params)
    peak, dropped_early = 0, 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.pool.num_used())
        for seq in eng.scheduler.running:
            held = len(eng.kv.held_blocks(seq.seq_id))
            if seq.num_computed < seq.prompt_len:
                dropped_early += seq.kv_dropped
            else:
                assert held <= -(-(32 + 8 + 1) // 8)
    assert dropped_early == 0
    assert eng.pool.num_free() == eng.pool.num_blocks
    assert peak < peak_full


def test_bad_schedule_and_score_are_refused(tiny):
    with pytest.raises((ValueError, SlimLMError), match="schedule must be one of prompt, online"):
        LLM(tiny, kv_policy="h2o", kv_policy_args={"schedule": "later"})
    with pytest.raises((ValueError, SlimLMError), match="score must be one of sum, mean"):
        LLM(tiny, kv_policy="h2o", kv_policy_args={"score": "max"})


def test_token_policies_refuse_sliding_windows(tmp_path):
    from tests.conftest import make_hf_model

    make_hf_model(tmp_path, "mistral", sliding_window=32)
    with pytest.raises(SlimLMError, match="sliding-window"):
        LLM(load(tmp_path), kv_policy="h2o")


@pytest.mark.parametrize("args", [{"schedule": "prompt"}, {"schedule": "online"}, {"score": "mean"}])
def test_parallel_samples_fork_the_compacted_cache(tiny, args):
    """n > 1 forks the prompt's KV after H2O compacted it: each child continues from the kept
    tokens (storage length and the policy's per-sequence state), so greedy children agree
    with a single greedy sample (one prompt: its chunks, which the online schedule depends on,
    are then the same in both runs)."""
    prompts = [(make_prompts(1, seed=12)[0] * 3)[:200]]
    kw = dict(kv_policy="h2o", kv_policy_args={"budget": 0.3, "min_tokens": 16, **args}, block_size=8,
              max_num_batched_tokens=64)
    one = LLM(tiny, **kw).generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                   use_tqdm=False)
    llm = LLM(tiny, **kw)
    two = llm.generate(prompts, SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for a, b in zip(one, two):
        assert [c.token_ids for c in b.outputs] == [a.outputs[0].token_ids] * 2
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_native_prefill_accumulates_mass_at_head_size_64(tmp_path, kv_dtype):
    """Head size 64: prefill chunks go through the native prefill kernel, which accumulates the
    attention mass itself (and reads an int8 pool in place); the engine still follows the dense
    H2O fed the same chunks (keys and values through the same codec)."""
    from tests.conftest import make_hf_model
    from tests.kvcache.test_codecs import roundtrip

    make_hf_model(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    lm = load(tmp_path)
    prompts = [(p * 3)[:120] for p in make_prompts(2, seed=14)]
    args = {"budget": 0.3, "min_tokens": 16}
    llm = LLM(lm, kv_policy="h2o", kv_policy_args=args, kv_cache_dtype=kv_dtype, block_size=8,
              max_num_batched_tokens=64)
    paths = llm.engine.runner.paths
    if paths.native_prefill is None:
        pytest.skip("no native prefill kernel on this CPU")
    assert paths.prefill_in_place and paths.track_mass
    outs, log, _ = engine_chunks(llm, prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    codecs = llm.engine.cache.codec, llm.engine.cache.vcodec
    for prompt, out, sid in zip(prompts, outs, sorted(log)):
        ref = DenseH2O(lm, KV_POLICIES.get("h2o")(**args), 8, len(prompt))
        if kv_dtype != "auto":
            ref.store = lambda k, v: (roundtrip(codecs[0], k.transpose(0, 1)).transpose(0, 1),  # noqa: E731
                                      roundtrip(codecs[1], v.transpose(0, 1)).transpose(0, 1))
        assert_reference_follows(ref, prompt, log[sid], out)


def test_window_scores_are_the_last_queries_attention(tiny):
    """``window=W``: at the first compaction each key's score is the attention the prompt's last
    W queries gave it (the dense computation on the same chunks), not the whole prompt's mass
    (int4 pools with the native kernels: ``test_h2o_with_rotated_int4_equals_dense_h2o``)."""
    prompt = (make_prompts(1, seed=12)[0] * 3)[:200]
    args = {"budget": 0.3, "min_tokens": 16, "window": 12}
    llm = LLM(tiny, kv_policy="h2o", kv_policy_args=args, block_size=8, max_num_batched_tokens=128)
    pol, seen = llm.engine.policy, []
    real = pol.select_seq

    def spy(seq_id, mass, *rest):
        seen.append(mass.clone())
        return real(seq_id, mass, *rest)

    pol.select_seq = spy
    # 2 tokens: the sequence still runs after its prompt's step, so it is compacted there
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    masses = {}
    for w in (12, 0):
        ref = DenseH2O(tiny, H2OPolicy(budget=1.0, window=w), 8, len(prompt))  # budget 1: no compaction
        ref.chunk(prompt[:128])
        ref.chunk(prompt[128:])
        masses[w] = torch.stack(ref.M)  # (L, H, S)
    assert seen and seen[0].shape == masses[12].shape
    assert torch.allclose(seen[0], masses[12], atol=1e-4, rtol=1e-3)
    assert not torch.allclose(seen[0], masses[0], atol=1e-2)
    assert float(masses[12].sum()) == pytest.approx(12 * tiny.model.cfg.num_heads * tiny.model.cfg.num_layers, rel=1e-4)
