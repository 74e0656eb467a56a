"""Chimera's full-context decoder (an attention draft over the target's features): lossless in
mixed batches and under preemption, trained on windows, its own KV freed."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts
from tests.engine.test_spec import exact_second_token_marginal, self_text


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load(tiny_llama_dir)


@pytest.fixture(scope="module")
def attn_adapter(target, tmp_path_factory):
    from slimlm.compress.chimera_attn_train import AttnTrainConfig, train_chimera_attn
    from slimlm.engine.spec.kangaroo import save_adapter

    net, meta = train_chimera_attn(target.model, self_text(target), AttnTrainConfig(head_vocab=0, steps=30, lr=3e-3),
                                   log=None)
    tr = meta["train"]
    assert tr["heldout_top1_agreement"] > tr["heldout_top1_agreement_init"]
    assert len(tr["heldout_top1_agreement_per_step"]) == 3
    return str(save_adapter(tmp_path_factory.mktemp("chimera-attn"), "chimera", net, meta))


def test_attention_draft_is_greedy_identical_in_mixed_batches(target, attn_adapter):
    """Greedy, sampled and logprob requests together (chunked prefill, shared prefixes from the
    prefix cache, forced preemption): greedy outputs equal plain decoding, drafts are accepted,
    and the draft keeps no state once every request is done."""
    from slimlm.engine.spec.chimera_attn import ChimeraAttnProposer

    c = target.model.cfg
    settings = dict(block_size=8, max_num_batched_tokens=32,
                    kv_cache_bytes=2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4 * 30)
    prompts = make_prompts(6, seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=10, seed=3, ignore_eos=True)
    withlp = SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)
    params = [greedy if i % 3 == 0 else sampled if i % 3 == 1 else withlp for i in range(len(prompts))]
    base = LLM(target, **settings).generate(prompts, params, use_tqdm=False)
    llm = LLM(target, speculative="chimera", speculative_args={"adapter": attn_adapter, "k": 4}, **settings)
    prop = llm.engine.proposer
    assert isinstance(prop, ChimeraAttnProposer)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (a, b) in enumerate(zip(outs, base)):
        if params[i].greedy:
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, i
            if params[i].logprobs:
                assert [list(x) for x in a.outputs[0].logprobs] == [list(x) for x in b.outputs[0].logprobs]
        else:
            assert len(a.outputs[0].token_ids) == 10
    st = llm.engine.stats
    assert st["draft_tokens"] > 0 and st["accepted_draft_tokens"] > 0
    assert llm.engine.scheduler.num_preemptions > 0
    assert not prop.ctxs and not prop.pending


def test_attention_draft_attends_the_whole_prefix(target, attn_adapter):
    """The draft's KV covers every position of the prompt and the accepted output (features of
    every prefill row reach it), and drafting leaves no drafted positions behind."""
    llm = LLM(target, speculative="chimera", speculative_args={"adapter": attn_adapter, "k": 3},
              enable_prefix_caching=False)
    prop = llm.engine.proposer
    lens = []
    orig = prop.propose

    def propose(seqs, sched=None, result=None):
        orig(seqs, sched, result)
        for s in seqs:
            st = prop.ctxs.get(s.seq_id)
            if st is not None and st.k is not None and s.draft_ids:
                lens.append((st.base, len(st.k), s.num_tokens))

    prop.propose = propose
    prompt = make_prompts(3, seed=9)[1]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert lens and all(b == 0 and m == n - 1 for b, m, n in lens)


def test_sampled_attention_draft_follows_the_target(target, attn_adapter):
    """Marginal of the 2nd token (the first drafted one: n = 1000 samples share the prompt's
    features) vs. the exact target marginal."""
    prompt = self_text(target, n=1, seed=7)[0, :12].tolist()
    exact = exact_second_token_marginal(target.model, prompt)
    llm = LLM(target, speculative="chimera", speculative_args={"adapter": attn_adapter, "k": 2})
    counts = torch.zeros_like(exact)
    out = llm.generate([prompt], SamplingParams(temperature=1.0, top_k=3, max_tokens=3, n=1000, seed=11),
                       use_tqdm=False)[0]
    for c in out.outputs:
        counts[c.token_ids[1]] += 1
    st = llm.engine.stats
    assert 0 < st["accepted_draft_tokens"] < st["draft_tokens"]
    tv = 0.5 * float((counts / counts.sum() - exact).abs().sum())
    assert tv < 0.06, tv  # 1,000 samples (seeded: deterministic)


def test_attention_adapter_bad_input_is_one_line(target, attn_adapter, tiny_llama_dir, tmp_path, capsys):
    from slimlm.cli import main

    with pytest.raises(SlimLMError, match="tree"):
        LLM(target, speculative="chimera", speculative_args={"adapter": attn_adapter, "tree": True})
    text = tmp_path / "text.txt"
    text.write_text("Small language models are fast to serve and cheap to train. " * 40)
    base = ["--model", str(tiny_llama_dir), "--data", str(text), "--tokens", "384", "--seq-len", "32"]
    assert main(["train-adapter", str(tmp_path / "a"), "--method", "kangaroo", "--decoder", "attention", *base]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    cache = tmp_path / "feats"
    for _ in range(2):  # the second run reads the cached features
        assert main(["train-adapter", str(tmp_path / "a"), "--method", "chimera", "--decoder", "attention", *base,
                     "--steps", "2", "--head-vocab", "64", "--feature-cache", str(cache)]) == 0
    err = capsys.readouterr().err
    assert "features read from" in err and "per draft step" in err and len(list(cache.iterdir())) == 1


def test_unrolled_training_pass_is_what_the_second_draft_step_sees(target):
    """Pass 1 of the trainer at position p equals serving: a draft over the real features up to
    p - 1 (cached keys), then one step at p on the predicted feature of p - 1."""
    from slimlm.compress.chimera_attn_train import unrolled
    from slimlm.engine.spec.chimera_attn import AttnDraft, DraftKV

    m = target.model.float()
    torch.manual_seed(0)
    net = AttnDraft.from_target(m).float()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        T, D = 9, m.cfg.hidden_size
        emb, H = torch.randn(1, T, D), torch.randn(1, T, D) * 30
        cos, sin = m.rotary(torch.arange(T)[None], torch.float32)
        g0, g1 = unrolled(net, emb, H, cos, sin, m.attn_scale, 2)
        P = 6
        kv = DraftKV(m.attn_scale, torch.ones(P, P, dtype=torch.bool).tril()[None])
        first = net(emb[:, :P], H[:, :P], cos[:, :P], sin[:, :P], kv)  # real features 0..P-1
        step = DraftKV(m.attn_scale, torch.ones(1, 1, P + 1, dtype=torch.bool), kv.new_k, kv.new_v)
        second = net(emb[:, P : P + 1], first[:, P - 1 : P], cos[:, P : P + 1], sin[:, P : P + 1], step)
    torch.testing.assert_close(first, g0[:, :P])
    torch.testing.assert_close(second[0, 0], g1[0, P], rtol=1e-4, atol=1e-4)
