"""Tree drafts verified as decode rows over per-path key views (``engine/spec/tree_rows.py``).

Under ``batch_invariant`` every node of a draft tree is its own decode row attending the
sequence's KV and its ancestors (not its siblings), so greedy output with tree drafts is bitwise
that of plain decoding, in bf16 too (the tree's one-pass prefill under an ancestor mask is not:
on the wide bf16 model below it changes the logprobs of most tokens and some tokens).
"""

from __future__ import annotations

import random

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.spec.tree_rows import leaf_paths, plan_tree_rows, scratch_needed
from slimlm.model.hub import load
from tests.conftest import make_hf_model
from tests.engine.test_engine import make_prompts
from tests.engine.test_spec import exact_second_token_marginal, noisy_draft, second_token_counts, target  # noqa: F401

TOP2 = [-1, 0, 1, 2, 0]  # root, a chain of 3 drafts, the runner-up of the first draft
NO_DEDUP = dict(enable_prefix_caching=False)
"""Every prompt of a batch prefilled in its first step (no prefix dedup holding some back): no decode
row then shares a step with a prefill chunk, where the layer path rounds bf16 rows differently
(``EngineConfig.batch_invariant``'s documented limit, for chains and plain decoding alike)."""


# ---------------------------------------------------------------- the plan
def simulate(parents: list[int], kv_start: int, table: list[int], bs: int):
    """Run a plan on a fake pool: the copies, then every row's KV write; returns the plan and,
    per (node, view) row, what its keys read (("ctx", i) for context row i, ("node", n))."""
    nxt = iter(range(1000, 2000))
    plan = plan_tree_rows(parents, kv_start, table, bs, lambda: next(nxt))
    pool = {}
    for b in table:
        for j in range(bs):
            pool[b * bs + j] = ("old", b * bs + j)
    for i in range(kv_start):  # the sequence's context
        pool[table[i // bs] * bs + i % bs] = ("ctx", i)
    for src, dst in plan.copies:
        for j in range(bs):
            pool[dst * bs + j] = pool.get(src * bs + j)
    rows = [(n, plan.home[n]) for n in range(len(parents))] + plan.twins
    written = [plan.slot(n, v) for n, v in rows]
    assert len(set(written)) == len(written)  # no two rows write one slot
    for (n, v), s in zip(rows, written):
        pool[s] = ("node", n)
    reads = {}
    for n, v in rows:
        i, blocks, logical = plan.decode(n, v)
        assert logical == list(range(len(logical)))  # nothing evicted here: a plain block table
        reads[n, v] = [pool.get(blocks[j // bs] * bs + j % bs) for j in range(i + 1)]
    return plan, reads


def ancestors(parents: list[int], n: int) -> list[int]:
    out = [n]
    while parents[out[-1]] >= 0:
        out.append(parents[out[-1]])
    return out[::-1]


def random_tree(rng: random.Random, size: int) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, size)]


@pytest.mark.parametrize("seed", range(40))
def test_every_row_reads_its_context_and_ancestors_in_order(seed):
    """On random trees, kv_starts and block sizes: each node's row (and each twin) attends
    exactly the context rows 0..kv_start-1 then its ancestors root first, then itself: what a
    plain decode step of that token would attend. Scratch slots never touch the sequence's
    blocks beyond the tree's own slots."""
    rng = random.Random(seed)
    parents = random_tree(rng, rng.randrange(1, 9))
    bs = rng.choice([2, 4, 8])
    kv_start = rng.randrange(0, 3 * bs)
    table = rng.sample(range(100), -(-(kv_start + len(parents)) // bs))
    plan, reads = simulate(parents, kv_start, table, bs)
    for (n, v), got in reads.items():
        assert got == [("ctx", i) for i in range(kv_start)] + [("node", a) for a in ancestors(parents, n)]
    own = {table[i // bs] * bs + i % bs for i in range(kv_start + len(parents))}
    for n in range(len(parents)):
        assert plan.home[n] > 0 or plan.slot(n) in own
    assert scratch_needed(parents, kv_start, table, bs) == len(plan.scratch)


def test_top2_tree_takes_one_scratch_block_and_one_twin_unless_it_branches_at_a_block_boundary():
    plan, _ = simulate(TOP2, 5, [10, 11], 8)
    assert plan.home == [0, 0, 0, 0, 1] and len(plan.scratch) == 1
    assert plan.twins == [(0, 1)] and plan.copies == [(10, plan.scratch[0])]
    plan, _ = simulate(TOP2, 7, [10, 11], 8)  # the runner-up sits at storage index 8: a new block
    assert plan.twins == [] and plan.copies == [] and plan.views[1] == [10, plan.scratch[0]]
    assert leaf_paths(TOP2) == [[0, 1, 2, 3], [0, 4]]
    assert leaf_paths([-1, 0, 1, 0, 3, 3]) == [[0, 1, 2], [0, 3, 4], [0, 3, 5]]


# ---------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory):
    """A model whose 1,536-wide down projection rounds bf16 rows differently by kernel, and the
    same weights plus noise as a draft that is often, not always, right."""
    t, n = tmp_path_factory.mktemp("wide-t"), tmp_path_factory.mktemp("wide-n")
    make_hf_model(t, "llama", seed=5, intermediate_size=1536)
    model = make_hf_model(n, "llama", seed=5, intermediate_size=1536)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(n)
    return t, n


def _outputs(llm, prompts, params, batch):
    """(tokens, logprob of each) per request: exact floats, equal only if every row rounded the same."""
    out = []
    for i in range(0, len(prompts), batch):
        for o in llm.generate(prompts[i : i + batch], params[i : i + batch], use_tqdm=False):
            c = o.outputs[0]
            out.append([(t, lp[t]) for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs else list(c.token_ids))
    return out


@pytest.mark.parametrize("dtype,settings", [("bfloat16", {}), ("bfloat16", {"native_kernels": False}),
                                            ("float32", {})])
def test_tree_drafts_are_bitwise_plain_decoding(wide_dirs, dtype, settings):
    """Greedy tokens and logprobs with top-2 tree drafts equal plain decoding of the same batch to
    the bit (batch 1 and 4); accepted paths left the main chain (the branch rows' logits were used).
    (float32 on the layer-by-layer path is left out: there a lone plain decode row already rounds
    differently from a chain's verification rows; see docs/techniques.md, "Tree drafts as rows".)"""
    target, noisy = load(wide_dirs[0], dtype=dtype), load(wide_dirs[1], dtype=dtype)
    settings = dict(settings, **NO_DEDUP)
    prompts = make_prompts(4, seed=11)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)] * len(prompts)
    plain = LLM(target, **settings)
    llm = LLM(target, speculative="draft", speculative_args={"model": noisy, "k": 3, "tree": True}, **settings)
    for batch in (1, 4):
        assert _outputs(llm, prompts, params, batch) == _outputs(plain, prompts, params, batch), batch
    st = llm.engine.stats
    assert st["tree_rows"] == st["verify_steps"] > 0 and st["tree_cut"] == 0
    assert st["tree_off_chain"] > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_mixed_batch_of_tree_chain_plain_and_sampled_rows_bf16(wide_dirs):
    """Steps hold tree drafts (greedy), chains (sampled requests), plain decode rows (the draft's KV
    holds a few sequences at a time) and greedy logprob requests: greedy ones are bitwise plain."""
    target, noisy = load(wide_dirs[0], dtype="bfloat16"), load(wide_dirs[1], dtype="bfloat16")
    c = target.model.cfg
    settings = dict(NO_DEDUP, kv_cache_bytes=2 * c.num_layers * 16 * c.num_kv_heads * c.head_dim * 2 * 300)
    prompts = make_prompts(6, seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    sampled = SamplingParams(temperature=0.8, max_tokens=12, seed=3, ignore_eos=True)
    params = [sampled if i % 3 == 1 else greedy for i in range(len(prompts))]
    plain = _outputs(LLM(target, **settings), prompts, params, len(prompts))
    llm = LLM(target, speculative="draft", speculative_args={"model": noisy, "k": 3, "tree": True,
                                                             "kv_fraction": 0.02}, **settings)
    kinds, run = set(), llm.engine.runner.execute

    def spy(out):
        kinds.add(frozenset("tree" if c.tree_rows else "chain" if c.num_drafts else "plain" if len(c.token_ids) == 1
                            else "prefill" for c in out.chunks))
        return run(out)

    llm.engine.runner.execute = spy
    got = _outputs(llm, prompts, params, len(prompts))
    for i, p in enumerate(params):
        if p.greedy:
            assert got[i] == plain[i], i
        else:
            assert len(got[i]) == 12
    assert any({"tree", "plain"} <= k for k in kinds) and any({"tree", "chain"} <= k for k in kinds), kinds
    st = llm.engine.stats
    assert st["tree_rows"] > 0 and st["tree_off_chain"] > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_tree_without_key_views_is_verified_as_its_main_chain(wide_dirs, monkeypatch):
    """A tree that gets no key views (the pool short of scratch blocks) is cut to its main chain
    and stays bitwise plain decoding."""
    import slimlm.engine.engine as eng

    target, noisy = load(wide_dirs[0], dtype="bfloat16"), load(wide_dirs[1], dtype="bfloat16")
    prompts = make_prompts(4, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)] * len(prompts)
    plain = _outputs(LLM(target, **NO_DEDUP), prompts, params, 4)
    monkeypatch.setattr(eng, "scratch_needed", lambda *a: 10**9)
    llm = LLM(target, speculative="draft", speculative_args={"model": noisy, "k": 3, "tree": True}, **NO_DEDUP)
    assert _outputs(llm, prompts, params, 4) == plain
    st = llm.engine.stats
    assert st["tree_cut"] == st["verify_steps"] > 0 and st["tree_rows"] == st["tree_off_chain"] == 0
    assert st["accepted_draft_tokens"] > 0


def test_tree_rows_under_preemption_and_chunked_prefill(target, noisy_draft):
    """A pool so small that sequences are preempted (and scratch blocks run short at times):
    greedy output with tree drafts equals plain decoding; every block comes back."""
    c = target.model.cfg
    settings = dict(block_size=8, max_num_batched_tokens=32,
                    kv_cache_bytes=2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4 * 40)
    prompts = make_prompts(8, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * len(prompts)
    plain = _outputs(LLM(target, **settings), prompts, params, len(prompts))
    llm = LLM(target, speculative="draft", speculative_args={"model": noisy_draft, "k": 3, "tree": True}, **settings)
    assert _outputs(llm, prompts, params, len(prompts)) == plain
    st = llm.engine.stats
    assert llm.engine.scheduler.num_preemptions > 0
    assert st["tree_rows"] > 0 and st["tree_off_chain"] > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_sampled_requests_beside_tree_drafts_follow_the_target(target, noisy_draft):
    """Sampled requests draft chains while greedy ones in the same steps draft trees verified as
    rows: the 2nd token's marginal still matches the target's exact one."""
    prompt = make_prompts(1, seed=5)[0]
    exact = exact_second_token_marginal(target.model, prompt)
    llm = LLM(target, speculative="draft", speculative_args={"model": noisy_draft, "k": 2, "tree": True})
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    orig = llm.generate

    def with_greedy(prompts, params, use_tqdm=False):  # greedy tree requests share every step
        outs = orig(make_prompts(2, seed=9) + prompts, [greedy] * 2 + [params], use_tqdm=use_tqdm)
        return outs[2:]

    llm.generate = with_greedy
    counts = second_token_counts(llm, prompt, exact)
    st = llm.engine.stats
    assert st["tree_rows"] > 0 and 0 < st["accepted_draft_tokens"] < st["draft_tokens"]
    tv = 0.5 * float((counts / counts.sum() - exact).abs().sum())
    assert tv < 0.05, tv
