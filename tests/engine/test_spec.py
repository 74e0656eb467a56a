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


@torch.no_grad()
def exact_second_token_marginal(model, prompt: list[int]) -> torch.Tensor:
    """The target's exact marginal of the 2nd generated token under temperature 1, top_k 3."""
    first = model(torch.tensor([prompt]))[0, -1].float()
    top = first.topk(3)
    p1 = torch.zeros_like(first).scatter(0, top.indices, top.values.softmax(-1))
    exact = torch.zeros_like(first)
    for t in top.indices.tolist():
        tk = model(torch.tensor([prompt + [t]]))[0, -1].float().topk(3)
        exact.scatter_add_(0, tk.indices, p1[t] * tk.values.softmax(-1))
    return exact


def second_token_counts(llm, prompt: list[int], like: torch.Tensor) -> torch.Tensor:
    """Counts of the 2nd generated token over 2 x 1000 samples (temperature 1, top_k 3)."""
    counts = torch.zeros_like(like)
    for rep in range(2):
        out = llm.generate([prompt], SamplingParams(temperature=1.0, top_k=3, max_tokens=3, n=1000,
                                                    seed=11 + rep * 5000), use_tqdm=False)[0]
        for c in out.outputs:
            counts[c.token_ids[1]] += 1
    return counts


def test_sampled_speculation_matches_target_marginal(target, noisy_draft):
    """Marginal of the 2nd token (the first drafted one) vs. the exact target marginal."""
    prompt = make_prompts(1, seed=5)[0]
    exact = exact_second_token_marginal(target.model, prompt)
    llm = LLM(target, speculative="draft", speculative_args={"model": noisy_draft, "k": 2})
    counts = second_token_counts(llm, prompt, exact)
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


# ---------------------------------------------------------------- every lossless method (issue 17)
def self_text(lm, n=24, length=64, seed=0):
    """Token windows of the model's own greedy text: what a trained draft should learn."""
    from tests.engine.test_engine import make_prompts as mp

    outs = LLM(lm).generate([(p * 8)[:8] for p in mp(n, seed=seed)],
                            SamplingParams(temperature=0, max_tokens=length, ignore_eos=True), use_tqdm=False)
    return torch.tensor([list(o.prompt_token_ids[:8]) + list(o.outputs[0].token_ids)[: length - 8] for o in outs])


@pytest.fixture(scope="module")
def kangaroo_adapter(target, tmp_path_factory):
    from slimlm.compress.spec_train import AdapterTrainConfig, train_kangaroo
    from slimlm.engine.spec.kangaroo import save_adapter

    ad, meta = train_kangaroo(target.model, self_text(target), AdapterTrainConfig(exit_layer=1, head_vocab=0, steps=60,
                                                                                 lr=3e-3), log=None)
    assert meta["train"]["heldout_top1_agreement"] > meta["train"]["heldout_top1_agreement_init"]
    return str(save_adapter(tmp_path_factory.mktemp("kangaroo"), "kangaroo", ad, meta))


@pytest.fixture(scope="module")
def chimera_adapter(target, tmp_path_factory):
    from slimlm.compress.spec_train import ChimeraTrainConfig, train_chimera
    from slimlm.engine.spec.kangaroo import save_adapter

    net, meta = train_chimera(target.model, self_text(target), ChimeraTrainConfig(head_vocab=0, steps=60, batch_size=32,
                                                                                  lr=3e-3), log=None)
    assert meta["train"]["heldout_top1_agreement"] > meta["train"]["heldout_top1_agreement_init"]
    return str(save_adapter(tmp_path_factory.mktemp("chimera"), "chimera", net, meta))


LOSSLESS = {
    "draft": lambda f: {"model": f["draft"], "k": 3},
    "chimera": lambda f: {"adapter": f["chimera_adapter"], "k": 4},
    "chimera-tree": lambda f: {"adapter": f["chimera_adapter"], "k": 3, "tree": True},
    "chimera-exit": lambda f: {"adapter": f["chimera_adapter"], "k": 6, "threshold": 0.02},
    "kangaroo": lambda f: {"adapter": f["kangaroo_adapter"], "k": 4, "threshold": 0.0},
    "kangaroo-exit": lambda f: {"adapter": f["kangaroo_adapter"], "k": 4, "threshold": 0.01},
    "kangaroo-tree": lambda f: {"adapter": f["kangaroo_adapter"], "k": 3, "threshold": 0.0, "tree": True},
}


@pytest.mark.parametrize("settings", [dict(max_num_batched_tokens=64),
                                      dict(block_size=8, max_num_batched_tokens=32, preempt=True),
                                      dict(enable_prefix_caching=False, native_kernels=False)])
@pytest.mark.parametrize("method", list(LOSSLESS))
def test_every_lossless_method_is_greedy_identical_in_mixed_batches(target, draft, kangaroo_adapter, chimera_adapter,
                                                                    method, settings):
    """Greedy requests mixed with sampled and logprob requests, with and without forced
    preemption: greedy outputs equal plain decoding; drafts were proposed and some accepted."""
    settings = dict(settings)
    c = target.model.cfg
    if settings.pop("preempt", False):
        settings["kv_cache_bytes"] = 2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4 * 40
    prompts = make_prompts(12, seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=10, seed=3, ignore_eos=True)
    withlp = SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)
    params = [greedy if i % 3 == 0 else sampled if i % 3 == 1 else withlp for i in range(len(prompts))]
    base = LLM(target, **settings).generate(prompts, params, use_tqdm=False)
    name = method.split("-")[0]
    args = LOSSLESS[method]({"draft": draft, "kangaroo_adapter": kangaroo_adapter, "chimera_adapter": chimera_adapter})
    llm = LLM(target, speculative=name, speculative_args=args, **settings)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (a, b) in enumerate(zip(outs, base)):
        if params[i].greedy:
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, (method, i)
        else:
            assert len(a.outputs[0].token_ids) == 10
    st = llm.engine.stats
    assert st["draft_tokens"] > 0 and st["accepted_draft_tokens"] > 0
    if settings.get("kv_cache_bytes"):
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_kangaroo_sampled_output_follows_the_target(target, kangaroo_adapter):
    """Marginal of the 2nd token (the first drafted one) vs. the exact target marginal."""
    prompt = make_prompts(1, seed=5)[0]
    exact = exact_second_token_marginal(target.model, prompt)
    llm = LLM(target, speculative="kangaroo", speculative_args={"adapter": kangaroo_adapter, "k": 2, "threshold": 0})
    counts = second_token_counts(llm, prompt, exact)
    st = llm.engine.stats
    assert 0 < st["accepted_draft_tokens"] < st["draft_tokens"]
    tv = 0.5 * float((counts / counts.sum() - exact).abs().sum())
    assert tv < 0.05, tv


def test_kangaroo_early_exit_drafts_fewer_and_accepts_more(target, kangaroo_adapter):
    prompts = make_prompts(8, seed=9)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    rates = {}
    for thr in (0.0, 0.015):  # the tiny target is nearly uniform: its confident drafts are rare
        llm = LLM(target, speculative="kangaroo", speculative_args={"adapter": kangaroo_adapter, "k": 4,
                                                                    "threshold": thr})
        llm.generate(prompts, p, use_tqdm=False)
        st = llm.engine.stats
        rates[thr] = (st["draft_tokens"], st["accepted_draft_tokens"] / max(st["draft_tokens"], 1))
    assert 0 < rates[0.015][0] < rates[0.0][0] and rates[0.015][1] > rates[0.0][1]


@pytest.mark.parametrize("args, match", [
    ({}, "needs a trained adapter"),
    ({"adapter": "/nonexistent"}, "not a trained adapter folder"),
    ({"threshold": 1.5}, "threshold must be in"),
])
def test_kangaroo_bad_input_is_one_line(target, kangaroo_adapter, args, match):
    from slimlm.errors import SlimLMError

    if "threshold" in args:
        args = {**args, "adapter": kangaroo_adapter}
    with pytest.raises(SlimLMError, match=match):
        LLM(target, speculative="kangaroo", speculative_args=args)


def test_kangaroo_adapter_of_another_model_is_refused(draft, kangaroo_adapter):
    from slimlm.errors import SlimLMError

    with pytest.raises(SlimLMError, match="another model"):
        LLM(draft, speculative="kangaroo", speculative_args={"adapter": kangaroo_adapter})


def test_exit_layer_outside_the_model_is_refused(target):
    from slimlm.compress.spec_train import AdapterTrainConfig, train_kangaroo
    from slimlm.errors import SlimLMError

    for layer in (0, target.model.cfg.num_layers, 99):
        with pytest.raises(SlimLMError, match="outside the model"):
            train_kangaroo(target.model, torch.zeros(4, 8, dtype=torch.long), AdapterTrainConfig(exit_layer=layer))


@pytest.mark.parametrize("where", ["propose", "bad-draft", "verify"])
def test_a_failing_proposer_degrades_only_its_request(target, draft, where):
    """The proposer fails for one request (raises in propose, returns a draft outside the
    vocabulary, or raises in verify): that request continues with plain decoding, the others
    keep drafting, and every greedy output is unchanged."""
    from slimlm.engine.spec.draft_model import DraftModelProposer

    prompts = make_prompts(6, seed=12)
    p = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in LLM(target).generate(prompts, p, use_tqdm=False)]
    llm = LLM(target, speculative="draft", speculative_args={"model": draft, "k": 3})
    prop = llm.engine.proposer
    bad = prompts[2]
    orig, orig_verify = DraftModelProposer.propose, prop.verify

    def propose(seqs, sched=None, result=None):
        if where == "propose" and any(s.request.prompt_ids == bad for s in seqs):
            raise RuntimeError("draft exploded")
        orig(prop, seqs, sched, result)
        for s in seqs:
            if where == "bad-draft" and s.request.prompt_ids == bad and s.draft_ids:
                s.draft_ids[0] = 10**9

    def verify(seq, logits, parents=None):
        if where == "verify" and seq.request.prompt_ids == bad:
            raise IndexError("malformed draft")
        return orig_verify(seq, logits, parents)

    prop.propose, prop.verify = propose, verify
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    assert got == base
    guard = llm.engine.spec_guard
    assert guard.failures == 1 and not guard.disabled  # forgotten when the request finished
    assert llm.engine.stats["accepted_draft_tokens"] > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


# ---------------------------------------------------------------- BiLD (lossy)
def test_bild_with_a_tiny_rollback_distance_is_the_target(target, noisy_draft):
    """Rollback 1e-6 nats keeps only drafts the target is certain of, i.e. its own argmax:
    greedy output equals plain decoding; fallback 1 means the small model never decodes."""
    prompts = make_prompts(8, seed=13)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in LLM(target).generate(prompts, p, use_tqdm=False)]
    for args in ({"fallback": 0.0, "rollback": 1e-6}, {"fallback": 1.0, "rollback": 5.0}):
        llm = LLM(target, speculative="bild", speculative_args={"model": noisy_draft, "k": 4, **args})
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == base
    assert llm.engine.stats["draft_tokens"] == 0


def test_bild_keeps_small_model_tokens_within_the_rollback_distance(target, noisy_draft):
    prompts = make_prompts(8, seed=14)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in LLM(target).generate(prompts, p, use_tqdm=False)]
    stats = {}
    for rb in (0.5, 50.0):
        llm = LLM(target, speculative="bild", speculative_args={"model": noisy_draft, "k": 4, "fallback": 0.0,
                                                                "rollback": rb})
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
        st = llm.engine.stats
        stats[rb] = st["accepted_draft_tokens"] / st["draft_tokens"]
        assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    assert stats[50.0] == 1.0 and stats[0.5] < 1.0  # a huge distance keeps every small-model token
    assert got != base  # ... and changes the output: lossy


def test_bild_sampled_requests_run(target, noisy_draft):
    llm = LLM(target, speculative="bild", speculative_args={"model": noisy_draft, "fallback": 0.0, "rollback": 10.0})
    outs = llm.generate(make_prompts(4, seed=15), SamplingParams(temperature=0.9, max_tokens=12, seed=1,
                                                                  ignore_eos=True, logprobs=1), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 and len(o.outputs[0].logprobs) == 12 for o in outs)
    assert llm.engine.stats["accepted_draft_tokens"] > 0


@pytest.fixture(scope="module")
def foreign_tokenizer_model(tmp_path_factory):
    """A draft whose tokenizer was trained on other text (other ids for the same strings)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("foreign")
    make_hf_model(path, "llama", seed=3, num_hidden_layers=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["zebra quantum xylophone " * 50, "lorem ipsum dolor " * 50],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    json.loads((path / "tokenizer_config.json").read_text())
    return load(path)


@pytest.mark.parametrize("args, match", [
    ({}, "needs a small model"),
    ({"fallback": 1.5}, "fallback must be in"),
    ({"rollback": 0}, "rollback must be a positive"),
    ({"rollback": -1.0}, "rollback must be a positive"),
    ({"foreign": True}, "tokenizer differs"),
])
def test_bild_bad_input_is_one_line(target, noisy_draft, foreign_tokenizer_model, args, match):
    from slimlm.errors import SlimLMError

    args = dict(args)
    if args:
        args["model"] = foreign_tokenizer_model if args.pop("foreign", False) else noisy_draft
    with pytest.raises(SlimLMError, match=match):
        LLM(target, speculative="bild", speculative_args=args)


def test_draft_with_another_tokenizer_is_refused(target, foreign_tokenizer_model):
    from slimlm.errors import SlimLMError

    with pytest.raises(SlimLMError, match="tokenizer differs") as e:
        LLM(target, speculative="draft", speculative_args={"model": foreign_tokenizer_model})
    assert "\n" not in str(e.value)


def test_train_adapter_cli_trains_and_refuses_bad_input(tiny_llama_dir, tmp_path, capsys):
    """`slimlm train-adapter` writes an adapter the engine loads; an exit layer outside the
    model and a missing adapter are one-line errors (exit 2)."""
    from slimlm.cli import main

    text = tmp_path / "text.txt"
    text.write_text("Small language models are fast to serve and cheap to train. " * 60)
    out = tmp_path / "ad"
    assert main(["train-adapter", str(out), "--model", str(tiny_llama_dir), "--data", str(text), "--tokens", "512",
                 "--seq-len", "32", "--exit-layer", "1", "--steps", "5", "--head-vocab", "64"]) == 0
    assert "training tokens" in capsys.readouterr().err
    llm = LLM(load(tiny_llama_dir), speculative="kangaroo", speculative_args={"adapter": str(out), "threshold": 0})
    assert llm.engine.proposer.token_map.numel() == 64
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
               .outputs[0].token_ids) == 6
    assert main(["train-adapter", str(tmp_path / "x"), "--model", str(tiny_llama_dir), "--data", str(text),
                 "--exit-layer", "2"]) == 2
    err = capsys.readouterr().err
    assert "outside the model" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--model", str(tiny_llama_dir), "--speculative", "kangaroo", "hi"]) == 2
    assert "needs a trained adapter" in capsys.readouterr().err


# ---------------------------------------------------------------- Chimera light draft, Judge decoding
def test_chimera_sampled_output_follows_the_target(target, chimera_adapter):
    """Marginal of the 2nd token (the first drafted one) vs. the exact target marginal. The
    prompt is the model's own text (a random prompt is too far from what the tiny draft learned
    for any of its top-3 tokens to be the target's)."""
    prompt = self_text(target, n=1, seed=7)[0, :12].tolist()
    exact = exact_second_token_marginal(target.model, prompt)
    llm = LLM(target, speculative="chimera", speculative_args={"adapter": chimera_adapter, "k": 2})
    counts = second_token_counts(llm, prompt, exact)
    st = llm.engine.stats
    assert 0 < st["accepted_draft_tokens"] < st["draft_tokens"]
    tv = 0.5 * float((counts / counts.sum() - exact).abs().sum())
    assert tv < 0.05, tv


def test_chimera_batched_rows_accept_differently_and_free_everything(target, chimera_adapter):
    """Several requests in one batch, each with its own acceptance per step; the proposer
    keeps no state for finished requests."""
    prompts = make_prompts(6, seed=21)
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(target, speculative="chimera", speculative_args={"adapter": chimera_adapter, "k": 4})
    prop = llm.engine.proposer
    seen: list[tuple[int, ...]] = []
    orig = prop.verify

    def verify(seq, logits, parents=None):
        n = len(seq.draft_ids)
        toks, lps, path = orig(seq, logits, parents)
        seen.append((seq.seq_id, n, len(toks) - 1))
        return toks, lps, path

    prop.verify = verify
    llm.generate(prompts, p, use_tqdm=False)
    assert len({s for s, _, _ in seen}) == 6 and len({a for _, _, a in seen}) > 1
    assert not prop.state and not prop.row


def test_max_batch_turns_speculation_off_above_it(target, chimera_adapter):
    """Above ``max_batch`` decoding sequences a step drafts nothing (plain decoding); at or
    below it speculation runs; the output is the same either way."""
    prompts = make_prompts(3, seed=5)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLM(target).generate(prompts, p, use_tqdm=False)]
    llm = LLM(target, speculative="chimera", speculative_args={"adapter": chimera_adapter, "k": 3, "max_batch": 2})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == plain
    skipped, drafted = llm.engine.spec_guard.skipped_steps, llm.engine.stats["draft_tokens"]
    assert skipped >= p.max_tokens - 3  # every step once the three decode together
    assert [o.outputs[0].token_ids for o in llm.generate(prompts[:2], p, use_tqdm=False)] == plain[:2]
    assert llm.engine.stats["draft_tokens"] > drafted and llm.engine.spec_guard.skipped_steps == skipped
    with pytest.raises(Exception, match="max_batch must be a positive"):
        LLM(target, speculative="chimera", speculative_args={"adapter": chimera_adapter, "max_batch": 0})


def test_cumulative_early_exit_drafts_less_and_stays_exact(target, chimera_adapter):
    """``cumulative``: drafting stops when the product of the draft's top-1 probabilities falls
    below the threshold, so never later than the per-token rule; output stays plain greedy."""
    prompts = make_prompts(2, seed=9)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLM(target).generate(prompts, p, use_tqdm=False)]
    drafted = {}
    for cum in (False, True):
        args = {"adapter": chimera_adapter, "k": 4, "threshold": 0.02, "cumulative": cum}
        llm = LLM(target, speculative="chimera", speculative_args=args)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == plain
        drafted[cum] = llm.engine.stats["draft_tokens"]
    assert drafted[True] < drafted[False]


def test_top_k_soft_targets_match_the_dense_loss():
    """The draft's training loss on the target's top-K entries + the rest's mass equals the
    dense soft cross-entropy when K is the whole head, and stays a cross-entropy below it."""
    from slimlm.compress.spec_train import _soft_ce

    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(5, 7, 50, generator=g) * 3, torch.randn(5, 7, 50, generator=g)
    dense = _soft_ce(q, z)
    full = _soft_ce(q, z.log_softmax(-1).topk(50, -1))
    assert torch.allclose(dense, full, atol=1e-5)
    top = _soft_ce(q, z.log_softmax(-1).topk(8, -1))
    assert 0 < float(top) < float(dense)  # coarser outcomes: a lower but positive cross-entropy


def test_spec_bench_profile_and_prompt_data(tiny_llama_dir, chimera_adapter, tmp_path):
    """spec-bench on another prompt set with the step profile: lossless output, and the costs
    (target forward by rows, draft cost c, the acceptance needed for 2x) are reported."""
    from slimlm.compress.spec_bench import spec_bench

    text = tmp_path / "prose.txt"
    text.write_text("Small language models are fast to serve and cheap to train. " * 200)
    r = spec_bench(str(tiny_llama_dir), {"speculative": "chimera", "speculative_args": {"adapter": chimera_adapter,
                   "k": 3}}, n_prompts=2, prompt_tokens=16, max_tokens=12, prompt_data=str(text), profile=True)
    assert r.identical and r.tokens == 24 and r.tokens_per_forward >= 1.0
    prof = r.profile
    assert prof["k"] == 3 and prof["c"] > 0 and prof["c_per"] == "pass" and prof["verify_cost"]
    # timings of a tiny model are noise: check how the figures relate, not their size
    parts = prof["forward_per_step"] + prof["propose_per_step"] + prof["overhead"]
    assert prof["step_cost"] > 0 and abs(prof["step_cost"] - parts) < 2e-3
    assert abs(prof["tokens_per_step_for_2x"] - 2 * prof["step_cost"]) < 0.011
    assert "predicted speedup" in "\n".join(r.lines())


def test_train_adapter_reads_several_sources(tiny_llama_dir, tmp_path):
    """Comma-separated --data: an equal share of each source, interleaved window by window."""
    from slimlm.compress.spec_cli import _windows

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma delta " * 100)
    b.write_text("one two three four five " * 100)
    tok = load(tiny_llama_dir).tokenizer
    w = _windows(f"{a},{b}", tok, 128, 16)
    wa, wb = _windows(str(a), tok, 64, 16), _windows(str(b), tok, 64, 16)
    assert w.shape == (8, 16) and torch.equal(w[0], wa[0]) and torch.equal(w[1], wb[0])


@pytest.fixture(scope="module")
def judge_head(target, tmp_path_factory):
    from slimlm.compress.spec_train import JudgeTrainConfig, train_judge
    from slimlm.engine.spec.kangaroo import save_adapter

    head, meta = train_judge(target.model, self_text(target), JudgeTrainConfig(corrupt_every=4, steps=200), log=None)
    assert meta["train"]["heldout_accept_correct"] > meta["train"]["heldout_accept_wrong"]
    return str(save_adapter(tmp_path_factory.mktemp("judge"), "judge", head, meta))


def test_judge_accepts_mismatched_drafts_and_is_exact_at_accept_1(target, chimera_adapter, judge_head):
    """accept = 1: exact verification (outputs identical); lower accept: the judge keeps
    drafts the target's argmax rejects (more accepted, output changes: lossy); accept -> 0
    keeps every draft. Sampled requests in the same batch run under the lossless rule."""
    prompts = make_prompts(8, seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=10, seed=3, ignore_eos=True)
    params = [greedy if i % 4 else sampled for i in range(len(prompts))]
    base = LLM(target).generate(prompts, params, use_tqdm=False)
    rates, judged = {}, {}
    for acc in (1.0, 0.5, 1e-6):
        llm = LLM(target, speculative="judge", speculative_args={"adapter": chimera_adapter, "head": judge_head,
                                                                 "k": 4, "accept": acc})
        outs = llm.generate(prompts, params, use_tqdm=False)
        same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b, p in zip(outs, base, params) if p.greedy]
        st = llm.engine.stats
        rates[acc] = st["accepted_draft_tokens"] / st["draft_tokens"]
        judged[acc] = llm.engine.proposer.counts["judge_accepted"]
        if acc == 1.0:
            assert all(same) and judged[acc] == 0
        assert all(len(o.outputs[0].token_ids) == p.max_tokens for o, p in zip(outs, params))
        assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    assert rates[1.0] < rates[0.5] <= rates[1e-6] and judged[0.5] > 0
    assert not all(same)  # accept -> 0: lossy


@pytest.mark.parametrize("method, args, match", [
    ("chimera", {}, "needs a trained adapter"),
    ("chimera", {"adapter": "KANGAROO"}, "trained for 'kangaroo'"),
    ("chimera", {"adapter": "CHIMERA", "threshold": -0.1}, "threshold must be in"),
    ("judge", {"adapter": "CHIMERA"}, "needs a trained judge head"),
    ("judge", {"adapter": "CHIMERA", "head": "JUDGE", "accept": 1.5}, "accept must be in"),
    ("judge", {"adapter": "CHIMERA", "head": "JUDGE", "accept": 0}, "accept must be in"),
    ("judge", {"adapter": "CHIMERA", "head": "CHIMERA"}, "trained for 'chimera'"),
    ("judge", {"head": "JUDGE"}, "needs a trained adapter"),
])
def test_light_draft_bad_input_is_one_line(target, kangaroo_adapter, chimera_adapter, judge_head, method, args, match):
    from slimlm.errors import SlimLMError

    where = {"KANGAROO": kangaroo_adapter, "CHIMERA": chimera_adapter, "JUDGE": judge_head}
    args = {k: where.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(SlimLMError, match=match) as e:
        LLM(target, speculative=method, speculative_args=args)
    assert "\n" not in str(e.value)


def test_chimera_adapter_of_another_model_is_refused(draft, chimera_adapter):
    from slimlm.errors import SlimLMError

    with pytest.raises(SlimLMError, match="another model"):
        LLM(draft, speculative="chimera", speculative_args={"adapter": chimera_adapter})


def test_train_adapter_cli_chimera_and_judge(tiny_llama_dir, tmp_path, capsys):
    from slimlm.cli import main

    text = tmp_path / "text.txt"
    text.write_text("Small language models are fast to serve and cheap to train. " * 60)
    base = ["--model", str(tiny_llama_dir), "--data", str(text), "--tokens", "512", "--seq-len", "32"]
    assert main(["train-adapter", str(tmp_path / "c"), "--method", "chimera", *base, "--steps", "5",
                 "--batch-size", "16", "--head-vocab", "64"]) == 0
    assert "top-1 agreement" in capsys.readouterr().err
    assert main(["train-adapter", str(tmp_path / "j"), "--method", "judge", *base, "--steps", "5"]) == 0
    assert "held-out accuracy" in capsys.readouterr().err
    llm = LLM(load(tiny_llama_dir), speculative="judge",
              speculative_args={"adapter": str(tmp_path / "c"), "head": str(tmp_path / "j"), "accept": 0.9})
    assert llm.engine.proposer.token_map.numel() == 64
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
               .outputs[0].token_ids) == 6
    assert main(["train-adapter", str(tmp_path / "x"), "--method", "chimera", *base, "--depth", "0"]) == 2
    err = capsys.readouterr().err
    assert "--depth" in err and len(err.strip().splitlines()) == 1
