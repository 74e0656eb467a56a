"""Speculative decoding: lossless for greedy, follows the target distribution when sampling."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.spec.verify import verify_sampled
from slimlm.model.hub import load
from tests.conftest import make_hf_model
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load(tiny_llama_dir)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    path = tmp_path_factory.mktemp("draft")
    make_hf_model(path, "llama", seed=1, num_hidden_layers=1)
    return load(path)


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("which", ["self", "other"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_identical_with_and_without_speculation(target, draft, which, k, tree):
    prompts = make_prompts(12, seed=3)
    p = SamplingParams(temperature=0, max_tokens=20)
    base = LLM(target).generate(prompts, p, use_tqdm=False)
    spec = LLM(target, speculative="draft", max_num_batched_tokens=64,
               speculative_args={"model": target if which == "self" else draft, "k": k, "tree": tree})
    outs = spec.generate(prompts, p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in base]
    st = spec.engine.stats
    assert st["draft_tokens"] > 0
    if which == "self":  # a draft equal to the target is always right (the tree's extra branch never)
        extra = st["verify_steps"] if tree else 0
        assert st["draft_tokens"] - extra <= st["accepted_draft_tokens"] <= st["draft_tokens"]
    assert spec.engine.pool.num_free() == spec.engine.pool.num_blocks


def test_verify_sampled_follows_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    counts = torch.zeros(4)
    N = 20000
    for _ in range(N):
        d = int(torch.multinomial(q[0], 1, generator=g))
        out = verify_sampled(p, q, [d], g)
        counts[out[0]] += 1
    assert torch.allclose(counts / N, p[0], atol=0.015)


@pytest.fixture(scope="module")
def noisy_draft(tmp_path_factory):
    """The target's weights plus noise: a draft that is often, not always, right."""
    path = tmp_path_factory.mktemp("noisy")
    model = make_hf_model(path, "llama", seed=0)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(path)
    return load(path)


def test_sampled_speculation_matches_target_marginal(target, noisy_draft):
    """Marginal of the 2nd token (the first drafted one) vs. the exact target marginal."""
    prompt = make_prompts(1, seed=5)[0]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, n=1000, seed=11)
    model = target.model
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].float()
        top = first.topk(3)
        p1 = torch.zeros_like(first).scatter(0, top.indices, top.values.softmax(-1))
        exact = torch.zeros_like(first)
        for t in top.indices.tolist():
            nxt = model(torch.tensor([prompt + [t]]))[0, -1].float()
            tk = nxt.topk(3)
            exact.scatter_add_(0, tk.indices, p1[t] * tk.values.softmax(-1))
    llm = LLM(target, speculative="draft", speculative_args={"model": noisy_draft, "k": 2})
    counts = torch.zeros_like(exact)
    for rep in range(2):
        out = llm.generate([prompt], SamplingParams(**{**params.__dict__, "seed": 11 + rep * 5000}),
                           use_tqdm=False)[0]
        for c in out.outputs:
            counts[c.token_ids[1]] += 1
    st = llm.engine.stats
    assert 0 < st["accepted_draft_tokens"] < st["draft_tokens"]  # both branches of the rule ran
    emp = counts / counts.sum()
    tv = 0.5 * float((emp - exact).abs().sum())
    assert tv < 0.05, tv


@pytest.mark.parametrize("settings", [dict(block_size=8, max_num_batched_tokens=16),
                                      dict(block_size=16, enable_prefix_caching=False, native_kernels=False)])
def test_tree_drafts_stay_lossless_and_accept_more(target, noisy_draft, settings):
    """Top-2 branching at the first draft position: outputs identical to plain decoding, and the
    runner-up branch is accepted whenever the draft's first choice was wrong and its second right."""
    prompts = make_prompts(10, seed=8)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in LLM(target, **settings).generate(prompts, p, use_tqdm=False)]
    stats = {}
    for tree in (False, True):
        llm = LLM(target, speculative="draft", speculative_args={"model": noisy_draft, "k": 3, "tree": tree},
                  **settings)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
        assert got == base
        st = llm.engine.stats
        stats[tree] = st["accepted_draft_tokens"] / st["verify_steps"]
        assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    assert stats[True] >= stats[False]


def test_tree_verification_walks_the_argmax_path():
    from slimlm.engine.spec.verify import verify_tree_greedy

    V = 6
    logits = torch.full((5, V), -1.0)
    # tree: 0 (root) -> 1 (tok 3) -> 2 (tok 4); 0 -> 3 (tok 5) -> 4 (tok 1)
    tokens, parents = [9, 3, 4, 5, 1], [-1, 0, 1, 0, 3]
    logits[0, 5] = 1  # the target picks the second branch at the root
    logits[3, 1] = 1  # then token 1, which node 4 drafted
    logits[4, 2] = 1  # bonus token after node 4
    toks, path = verify_tree_greedy(logits, tokens, parents)
    assert toks == [5, 1, 2] and path == [0, 3, 4]


def test_a_draft_cache_too_small_degrades_to_plain_decoding(target, draft):
    """The draft's own KV pool runs short: those sequences decode without drafts this step,
    nothing fails, output unchanged."""
    prompts = make_prompts(16, seed=6)
    p = SamplingParams(temperature=0, max_tokens=12)
    base = [o.outputs[0].token_ids for o in LLM(target).generate(prompts, p, use_tqdm=False)]
    c = target.model.cfg
    llm = LLM(target, speculative="draft", speculative_args={"model": draft, "k": 3, "kv_fraction": 0.01},
              block_size=8, kv_cache_bytes=2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4 * 400)
    assert len(llm.engine.proposer.kv.pool.ref_count) < 10  # a handful of draft blocks for 16 sequences
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    assert got == base and llm.engine.stats["draft_tokens"] > 0
