"""LazyLLM in the engine against a dense, unbatched reference of the same method.

The reference runs one prompt with a dense per-layer KV cache: every layer writes the KV of
the rows it runs, and a query sees every written key at or before its position. Prefill: all
rows run up to a pruning layer, where the last token's attention keeps the top fraction; the
pruned rows' hidden states wait; the first decode step runs them again from their pruning
layer (revival) beside the new token. The engine must give the same tokens whatever the chunk
size, block size, batching, prefix caching and preemption, leave pruned tokens' KV unwritten
until revived, and end with the reference's KV.
"""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.hooks.lazyllm import LazyLLM
from slimlm.model.attention import attention
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts

ARGS = {"layers": [2, 4], "keep": [0.5, 0.25], "min_tokens": 16}
SENTINEL = 1e4  # pools start here: a slot still holding it was never written


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("deep6")
    make_hf_model(path, "llama", num_hidden_layers=6)
    return load(path)


class DenseKV:
    """Dense per-layer cache as an attention backend: rows at ``self.pos`` write, then attend."""

    def __init__(self, model, n: int):
        c = model.cfg
        self.k = torch.zeros(c.num_layers, c.num_kv_heads, n, c.head_dim)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(c.num_layers, n, dtype=torch.bool)
        self.scale, self.pos = model.attn_scale, None

    def attend(self, layer, q, k, v, q_rows=None):
        pos = self.pos
        self.k[layer][:, pos], self.v[layer][:, pos] = k[0], v[0]
        self.valid[layer, pos] = True
        qp = pos if q_rows is None else pos[q_rows]
        keys = self.valid[layer].nonzero()[:, 0]
        mask = keys[None, :] <= qp[:, None]  # (R, S)
        return attention(q, self.k[layer][None][:, :, keys], self.v[layer][None][:, :, keys], mask[None, None],
                         self.scale)


@torch.no_grad()
def lazy_reference(lm, args, prompt, n):
    """(greedy tokens, DenseKV) of LazyLLM with revival in the first decode step."""
    m = lm.model
    hook = LazyLLM(**args)
    hook.bind(m)
    P = len(prompt)
    kv = DenseKV(m, P + n)
    ids = torch.tensor([prompt])
    pos = torch.arange(P)
    h = m.embed(ids)  # (1, P, D)
    cos, sin = m.rotary(pos[None], h.dtype)
    present = pos.clone()
    aux: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(m.model.layers):
        if i in hook._at and P >= hook.min_tokens:
            target = max(1, int(P * hook._at[i]))
            if present.numel() > target:
                drop = hook._select(i, h, present, pos, P, target)
                aux[i] = (drop, h[0, drop].clone())
                present = present[~torch.isin(present, drop)]
        kv.pos = present
        h[:, present] = layer(h[:, present], cos[:, present], sin[:, present], kv)
    out = [int(m.head(h[0, P - 1 :])[0].argmax())]
    for t in range(1, n):  # decode steps; the first one revives every pruned token
        p = P + t - 1
        rows_pos = torch.tensor([p])
        x = m.embed(torch.tensor([[out[-1]]]))
        for i, layer in enumerate(m.model.layers):
            if i in aux and t == 1:
                rp, rh = aux[i]
                rows_pos = torch.cat([rp, rows_pos])
                x = torch.cat([rh[None], x], 1)
                order = rows_pos.argsort()
                rows_pos, x = rows_pos[order], x[:, order]
            kv.pos = rows_pos
            c, s = m.rotary(rows_pos[None], x.dtype)
            x = layer(x, c, s, kv)
        out.append(int(m.head(x[0, -1:])[0].argmax()))
    return out, kv


def engine(lm, lazy=ARGS, **settings):
    """An LLM with a small KV pool (the default one is sized from free memory)."""
    settings.setdefault("kv_cache_bytes", tight_bytes(lm.model, 400, settings.get("block_size", 16)))
    hooks = dict(hooks=["lazyllm"], hook_args={"lazyllm": lazy}) if lazy is not None else {}
    return LLM(lm, **hooks, **settings)


def greedy(llm, prompts, n=8):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]


def prompts_for_test():
    return [p for p in ((q * 3)[:150] for q in make_prompts(5, seed=4)) if len(p) >= 16]


@pytest.fixture(scope="module")
def want(deep):
    return [lazy_reference(deep, ARGS, p, 8)[0] for p in prompts_for_test()]


def tight_bytes(model, blocks, bs=8):
    c = model.cfg
    return 2 * c.num_layers * bs * c.num_kv_heads * c.head_dim * 4 * blocks


@pytest.mark.parametrize("settings", [
    dict(max_num_batched_tokens=16, block_size=8),
    dict(max_num_batched_tokens=64, block_size=16, enable_prefix_caching=False),
    dict(max_num_batched_tokens=512, block_size=8, native_kernels=False),
    dict(max_num_batched_tokens=64, block_size=8, preempt=True),
])
def test_engine_equals_dense_reference(deep, want, settings):
    """Chunk sizes 16 / 64 / 512 (a prompt split over up to 10 chunks is pruned as a whole by its
    last token), block sizes 8 / 16, prefix caching on / off, batching, forced preemption."""
    settings = dict(settings)
    if settings.pop("preempt", False):
        settings["kv_cache_bytes"] = tight_bytes(deep.model, 48)
    llm = engine(deep, **settings)
    assert greedy(llm, prompts_for_test()) == want
    if "kv_cache_bytes" in settings:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    assert not llm.engine.hooks[0]._aux  # every sequence's auxiliary cache was dropped


def test_pruning_changes_the_output(deep, want):
    assert want != greedy(engine(deep, None), prompts_for_test())


def test_keep_all_equals_plain_prefill(deep):
    """keep = 1.0 prunes nothing (the chunks still wait for the last one and run the deep layers
    together): the same tokens and logprobs as plain prefill."""
    args = dict(ARGS, keep=[1.0, 1.0])
    prompts = prompts_for_test()
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    a = engine(deep, args, max_num_batched_tokens=32).generate(prompts, p, use_tqdm=False)
    b = engine(deep, None, max_num_batched_tokens=32).generate(prompts, p, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for la, lb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert all(abs(la[t] - lb[t]) < 1e-4 for t in la)


@torch.inference_mode()
def _kv(engine, seq_id, n):
    """(L, 2, n, Hkv, d) of a running sequence's first n tokens, read back from the cache."""
    cache, bs = engine.cache, engine.config.block_size
    blocks = torch.tensor(engine.kv.tables[seq_id])
    layers = []
    for layer in range(len(engine.model.model.layers)):
        k = cache.gather("k", layer, blocks).flatten(0, 1)[:n].clone()  # the gather reuses its workspace
        v = cache.gather("v", layer, blocks).flatten(0, 1)[:n].clone()
        layers.append(torch.stack([k, v]))
    return torch.stack(layers)


def _run_until_first_token(llm, prompt):
    eng = llm.engine
    with torch.inference_mode():
        for parts in eng.cache.k + eng.cache.v:
            for t in parts:
                t.fill_(SENTINEL)
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    seq = eng.scheduler.waiting[0]
    while not seq.output_ids:
        eng.step()
    return eng, seq


def test_pruned_kv_is_absent_until_revived_then_equals_the_reference(deep):
    prompt = prompts_for_test()[0]
    P = len(prompt)
    eng, seq = _run_until_first_token(engine(deep, max_num_batched_tokens=32, block_size=8), prompt)
    hook = eng.hooks[0]
    pending = hook._aux[seq.seq_id].pending
    assert set(pending) == {2, 4}
    depth = torch.full((P,), 6)
    for layer, (pos, _) in pending.items():
        depth[pos] = layer
    assert (depth == 2).sum() == P - P // 2 and (depth == 4).sum() == P // 2 - P // 4
    kv = _kv(eng, seq.seq_id, P)  # (L, 2, P, Hkv, d)
    written = (kv != SENTINEL).all(-1).all(-1).all(1)  # (L, P)
    assert torch.equal(written, torch.arange(6)[:, None] < depth[None, :])  # KV only where the token ran
    eng.step()  # the first decode step revives every pruned token
    assert not hook._aux[seq.seq_id].pending
    kv = _kv(eng, seq.seq_id, P)
    assert bool((kv != SENTINEL).all())
    _, ref = lazy_reference(deep, ARGS, prompt, 2)
    want = torch.stack([ref.k[:, :, :P], ref.v[:, :, :P]], 1).transpose(-2, -3)  # (L, 2, P, Hkv, d)
    torch.testing.assert_close(kv, want, atol=1e-4, rtol=1e-4)
    # tokens up to the first pruned one saw no pruned token: their KV is full prefill's
    first = int((depth < 6).nonzero()[0])
    plain, pseq = _run_until_first_token(engine(deep, None, max_num_batched_tokens=32, block_size=8), prompt)
    full = _kv(plain, pseq.seq_id, P)
    torch.testing.assert_close(kv[:, :, : first + 1], full[:, :, : first + 1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(kv[-1], full[-1], atol=1e-3)  # later tokens' deep KV saw fewer tokens


def test_forked_samples_revive_their_own_copies(deep):
    prompt = prompts_for_test()[1]
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=3)
    llm = engine(deep, max_num_batched_tokens=64, block_size=8)
    out = llm.generate([prompt], p, use_tqdm=False)[0]
    ref = lazy_reference(deep, ARGS, prompt, 5)[0]
    assert [o.token_ids for o in out.outputs] == [ref] * 3
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_short_prompts_and_prompt_logprobs_are_not_pruned(deep):
    prompts = prompts_for_test()[:2]
    plain = engine(deep, None, max_num_batched_tokens=64)
    lazy = engine(deep, dict(ARGS, min_tokens=1000), max_num_batched_tokens=64)
    assert greedy(lazy, prompts, 4) == greedy(plain, prompts, 4)
    p = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    lazy = engine(deep, max_num_batched_tokens=64)
    a, b = lazy.generate(prompts, p, use_tqdm=False), plain.generate(prompts, p, use_tqdm=False)
    assert [x.outputs[0].token_ids for x in a] == [x.outputs[0].token_ids for x in b]


def test_refused_with_a_kv_policy(deep):
    from slimlm.errors import SlimLMError

    with pytest.raises(SlimLMError, match="cannot be combined with kv_policy"):
        engine(deep, kv_policy="sink")


def test_quantized_kv_does_not_depend_on_chunking(deep):
    """int8 KV: the earlier chunks' shallow KV is read back through the codec, the deep layers
    of a prompt run in its final step: the same tokens whatever the chunk size."""
    prompts = prompts_for_test()[:3]
    got = [greedy(engine(deep, kv_cache_dtype="int8", max_num_batched_tokens=b, block_size=8), prompts, 6)
           for b in (16, 512)]
    assert got[0] == got[1]


# ---------------------------------------------------------------- selection variants (observation window, ...)
VARIANT = {"window": 20, "heads": "max", "pool": 3, "sinks": 2}


def _scores_by_hand(model, layer, h, kept, P, window, heads, pool):
    """The window's attention to ``kept`` (ascending positions), written out head by head."""
    blk, c = model.model.layers[layer], model.cfg
    x = blk.input_layernorm(h[0, kept])
    cos, sin = model.rotary(kept[None], h.dtype)
    q = model.model.layers[layer].self_attn.q_proj(x).view(-1, c.num_heads, c.head_dim)
    k = model.model.layers[layer].self_attn.k_proj(x).view(-1, c.num_kv_heads, c.head_dim)
    half = c.head_dim // 2

    def rope(t):  # (n, H, d), rotate-half convention
        rot = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * cos[0][:, None] + rot * sin[0][:, None]

    q, k = rope(q), rope(k)
    win = [i for i, p in enumerate(kept.tolist()) if p >= P - window]
    per_head = []
    for hq in range(c.num_heads):
        kv = hq // (c.num_heads // c.num_kv_heads)
        rows = []
        for i in win:
            logits = torch.full((len(kept),), float("-inf"))
            for j in range(i + 1):  # keys at or before the query
                logits[j] = float(q[i, hq] @ k[j, kv]) * model.attn_scale
            rows.append(logits.softmax(0))
        per_head.append(torch.stack(rows).mean(0))
    s = torch.stack(per_head)
    s = s.mean(0) if heads == "mean" else s.amax(0)
    r = pool // 2
    return torch.stack([s[max(0, j - r) : j + r + 1].max() for j in range(len(s))])


@torch.no_grad()
@pytest.mark.parametrize("args", [dict(window=1, heads="mean", pool=1), dict(window=6, heads="max", pool=3)])
def test_scores_equal_a_computation_by_hand(deep, args):
    m = deep.model
    prompt = prompts_for_test()[0]
    P = len(prompt)
    pos = torch.arange(P)
    seen = {}
    hk = m.model.layers[2].register_forward_pre_hook(lambda mod, a: seen.__setitem__("h", a[0].clone()))
    try:
        m(torch.tensor([prompt]))
    finally:
        hk.remove()
    hook = LazyLLM(**ARGS, **args)
    hook.bind(m)
    kept = pos[torch.arange(P) % 3 != 1]  # a pruned prompt: gaps between the running tokens
    kept = torch.cat([kept[kept < P - 8], pos[P - 8 :]]).unique()
    got = hook._importance(2, seen["h"], kept, kept, P)
    want = _scores_by_hand(m, 2, seen["h"], kept, P, args["window"], args["heads"], args["pool"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_window_and_sinks_always_continue(deep):
    m = deep.model
    prompt = prompts_for_test()[0]
    P = len(prompt)
    pos = torch.arange(P)
    h = m.embed(torch.tensor([prompt]))
    hook = LazyLLM(**ARGS, **VARIANT)
    hook.bind(m)
    rows = pos.flip(0)  # any row order: selection is by position
    drop = hook._select(2, h, rows, pos, P, 30)
    assert drop.numel() == P - 30 and torch.equal(drop, drop.sort().values)
    assert bool(((drop >= 2) & (drop < P - 20)).all())
    assert hook._select(2, h, rows, pos, P, 5).numel() == P - 22  # the forced rows exceed the target


def test_variant_in_the_engine_equals_the_dense_reference(deep):
    """Another variant than the defaults (which the tests above run: window 8, max, pool 7): a
    window wider than a chunk (20 > 16 rows), pool 3, sinks; batched."""
    args = dict(ARGS, **VARIANT)
    prompts = prompts_for_test()[:2]
    want = [lazy_reference(deep, args, p, 4)[0] for p in prompts]
    llm = engine(deep, args, max_num_batched_tokens=16, block_size=8)
    assert greedy(llm, prompts, 4) == want
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_prefill_work_counts_rows_and_pairs():
    from slimlm.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=30, num_heads=4,
                      num_kv_heads=2)
    paper = dict(layers=[1 / 3, 2 / 3], keep=[0.5, 0.25])
    w = LazyLLM(**paper).prefill_work(cfg, 4096)  # layers 10 / 20 keep 1/2 then 1/4 of the rows
    assert w["linear"] == pytest.approx((10 + 10 * 0.5 + 10 * 0.25) / 30)
    assert w["attention"] == pytest.approx((10 + 10 * 0.25 + 10 * 0.0625) / 30, rel=1e-3)
    assert w["linear"] > w["share"] > w["attention"]
    keep_all = LazyLLM(**dict(paper, keep=[1.0, 1.0])).prefill_work(cfg, 4096)
    assert keep_all["linear"] == keep_all["attention"] == 1 and 1 < keep_all["share"] < 1.01  # + scoring
    assert LazyLLM().prefill_work(cfg, 32)["share"] == 1  # under min_tokens: not pruned
    tiny_keep = LazyLLM(**dict(paper, keep=[0.01, 0.01]), window=64).prefill_work(cfg, 4096)
    assert tiny_keep["linear"] == pytest.approx((10 + 20 * 64 / 4096) / 30)  # the window always continues
