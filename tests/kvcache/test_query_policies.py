"""Query policies (Squeezed Attention, ShadowKV) in the engine equal a dense, unpaged decoder of
the same method (batched, chunked prefill, shared prefixes); with nothing to drop they are full
attention; the prefix summary is built once per shared prefix; bad settings are one-line errors."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.kvcache.policy import KV_POLICIES
from slimlm.model.attention import attention
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


class MethodDense:
    """Unpaged decoder of a query policy: the prompt attends causally; each decoded token runs
    the policy's summary and selection on the full prefix (fresh, no cache) and attends to the
    kept prefix keys (rebuilt ones where the method rebuilds) and every key after the prefix."""

    def __init__(self, policy, rotary):
        self.policy, self.rotary, self.K, self.V = policy, rotary, {}, {}

    def attend(self, layer, q, k, v):
        K = torch.cat([self.K[layer], k], 2) if layer in self.K else k
        V = torch.cat([self.V[layer], v], 2) if layer in self.V else v
        self.K[layer], self.V[layer] = K, V
        T, S = q.shape[2], K.shape[2]
        if T > 1:
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
            return attention(q, K, V, mask, q.shape[-1] ** -0.5)
        P = self.policy.prefix_len(S - 1)
        mask = torch.ones(1, q.shape[1], 1, S, dtype=torch.bool)
        Kd = K
        if P >= self.policy.min_prefix:
            s = self.policy.summary(layer, K[0, :, :P], V[0, :, :P], torch.arange(P), self.rotary)
            keep, k_new, _ = self.policy.select(s, q[0, :, 0], K[0, :, :P], self.rotary, P)
            if k_new is not None:
                Kd = K.clone()
                Kd[0, :, :P] = k_new
            mask[0, :, 0, :P] = keep
        return attention(q, Kd, V, mask, q.shape[-1] ** -0.5)


def dense_greedy(lm, policy, prompt, n):
    ref = MethodDense(policy, lm.model.rotary)
    ids, out = list(prompt), []
    with torch.no_grad():
        x, pos = torch.tensor([ids]), torch.arange(len(ids))[None]
        for _ in range(n):
            logits = lm.model(x, pos, ref)
            out.append(int(logits[0, -1].argmax()))
            x, pos = torch.tensor([[out[-1]]]), torch.tensor([[pos[0, -1] + 1]])
    return out


ARGS = {"squeezed": {"budget": 0.3, "clusters": 6, "min_prefix": 32, "granule": 16, "recent": 8},
        "shadowkv": {"rank": 6, "chunk": 4, "budget": 0.25, "outliers": 0.1, "min_prefix": 32, "granule": 16,
                     "recent": 8}}


def shared_prompts():
    base = make_prompts(8, seed=5)
    doc = (base[0] + base[2] + base[4])[:120]  # a shared "document"
    return [doc + base[1][:20], doc + base[3][:15], base[5][:50]]


@pytest.mark.parametrize("name", ["squeezed", "shadowkv"])
@pytest.mark.parametrize("chunk,block", [(16, 8), (64, 16)])
def test_engine_equals_dense_method(tiny, name, chunk, block):
    prompts = shared_prompts()
    llm = LLM(tiny, kv_policy=name, kv_policy_args=ARGS[name], max_num_batched_tokens=chunk, block_size=block)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == dense_greedy(tiny, KV_POLICIES.get(name)(**ARGS[name]), p, 8)
    st = llm.engine.policy.stats
    assert st["keys_attended"] < st["keys_stored"] and st["bytes_read"] < st["bytes_full"]
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_the_method_changes_attention_and_budget_one_is_full_attention(tiny):
    prompts = shared_prompts()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    full = [o.outputs[0].token_ids for o in LLM(tiny).generate(prompts, params, use_tqdm=False)]
    args = {**ARGS["squeezed"], "budget": 1.0}
    assert [o.outputs[0].token_ids for o in LLM(tiny, kv_policy="squeezed", kv_policy_args=args)
            .generate(prompts, params, use_tqdm=False)] == full


def test_shadowkv_full_rank_rebuilds_the_keys(tiny):
    pol = KV_POLICIES.get("shadowkv")(rank=16, chunk=4, budget=1.0, outliers=0.0)
    torch.manual_seed(0)
    P, rot = 32, tiny.model.rotary
    pre = torch.randn(2, P, 16)
    cos, sin = rot(torch.arange(P)[None], torch.float32)
    from slimlm.model.rope import apply_rope

    keys = apply_rope(pre[None], cos, sin)[0]
    s = pol.summary(0, keys, keys, torch.arange(P), rot)
    keep, k_new, _ = pol.select(s, torch.randn(4, 16), keys, rot, P)
    assert bool(keep.all())
    torch.testing.assert_close(k_new, keys, rtol=1e-4, atol=1e-4)


def test_summary_is_built_once_per_shared_prefix(tiny):
    doc = shared_prompts()[0][:120]
    prompts = [doc + [7, 8, 9, 10] * 3, doc + [11, 12] * 5]
    args = {**ARGS["squeezed"], "prefix": 96}
    llm = LLM(tiny, kv_policy="squeezed", kv_policy_args=args, block_size=8)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    st = llm.engine.policy.stats
    assert st["summaries_built"] == tiny.model.cfg.num_layers  # one per layer, shared by both prompts
    assert st["summary_hits"] > 0 and llm.engine.stats["computed_prompt_tokens"] < llm.engine.stats["prompt_tokens"]
    # two different prefixes decoding side by side keep one summary each (no thrashing)
    other = shared_prompts()[2][:40] + doc[:80]
    llm = LLM(tiny, kv_policy="squeezed", kv_policy_args=args, block_size=8)
    llm.generate([prompts[0], other + [5] * 12], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    assert llm.engine.policy.stats["summaries_built"] == 2 * tiny.model.cfg.num_layers


@pytest.mark.parametrize("name,args,msg", [
    ("shadowkv", {"rank": 16}, "not below the head size 16"),
    ("shadowkv", {"rank": 0}, "rank must be a positive integer"),
    ("squeezed", {"clusters": 100, "prefix": 64}, "exceed the prefix's 64 keys"),
    ("squeezed", {"budget": 1.5}, "budget must be a fraction"),
    ("shadowkv", {"budget": 0}, "budget must be a fraction"),
])
def test_bad_settings_are_one_line(tiny, name, args, msg):
    with pytest.raises(ValueError, match=msg):
        LLM(tiny, kv_policy=name, kv_policy_args=args)


def test_eval_reports_the_bytes_read(tiny_llama_dir, tmp_path):
    import json

    from slimlm.cli import main

    filler = tmp_path / "filler.txt"
    filler.write_text("The quick brown fox jumps over the lazy dog. Small language models are fast to serve. " * 40)
    out = tmp_path / "r.json"
    assert main(["eval", "needle", "--model", str(tiny_llama_dir), "--lengths", "160", "--depths", "0.5", "--trials",
                 "2", "--filler", str(filler), "--threads", "1", "--kv-policy", "squeezed", "--kv-policy-arg",
                 "min_prefix=32", "--kv-policy-arg", "clusters=4", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    st = rep["kv_policy_stats"]
    assert 0 < st["bytes_read"] < st["bytes_full"] and any("decode attention read" in n for n in rep["notes"])


@pytest.mark.parametrize("name", ["squeezed", "shadowkv"])
def test_speculative_decoding_is_refused(tiny, name):
    from slimlm.errors import SlimLMError

    with pytest.raises(SlimLMError, match="selects keys per decode query"):
        LLM(tiny, kv_policy=name, kv_policy_args=ARGS[name], speculative="draft")


@pytest.mark.parametrize("name,kv_dtype", [("squeezed", "auto"), ("shadowkv", "int8")])
def test_native_sparse_kernel_equals_the_pytorch_path(tiny, name, kv_dtype):
    """The sparse decode kernel reads only the chosen keys; its greedy tokens and its counted
    reads equal the PyTorch path's (which gathers every key and masks)."""
    prompts = shared_prompts()[:2]  # two requests sharing one document
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    runs = []
    for native in (True, False):
        llm = LLM(tiny, kv_policy=name, kv_policy_args=ARGS[name], block_size=8, native_kernels=native,
                  kv_cache_dtype=kv_dtype)
        assert (llm.engine.runner.paths.sparse_native is not None) == native
        # an fp32 pool's native run takes the native decode layers (an int8 pool: the layer path)
        assert (llm.engine.runner.native_layers is not None) == (native and kv_dtype == "auto")
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runs.append((outs, {k: llm.engine.policy.stats[k] for k in ("keys_attended", "bytes_read", "bytes_full")}))
    assert runs[0] == runs[1]
    assert runs[0][1]["bytes_read"] < runs[0][1]["bytes_full"]  # the method did select


def test_native_summary_is_dropped_when_its_blocks_are_rewritten(tiny):
    """Native summaries are keyed by the prefix's physical blocks: a write into one of them (a
    freed block reused by another sequence) drops the summary, whatever its sampled rows say."""
    doc = shared_prompts()[0][:120]
    args = {**ARGS["squeezed"], "prefix": 96}
    llm = LLM(tiny, kv_policy="squeezed", kv_policy_args=args, block_size=8)
    llm.generate([doc + [7, 8] * 4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    pol = llm.engine.policy
    (key, (blocks, _, _)), = [(k, e) for k, e in pol._cache[0].items() if k[0] == "blocks"]
    pol.written(0, torch.tensor([999 * 8 + 1]), 8)  # another block: kept
    assert key in pol._cache[0]
    pol.written(0, torch.tensor([sorted(blocks)[5] * 8 + 2]), 8)  # one of the prefix's blocks: dropped
    assert key not in pol._cache[0] and any(k[0] == "blocks" for k in pol._cache[1])


def _native_layer_runs(llm) -> list[int]:
    """Counts the steps the runner hands to the native layers' query-policy path."""
    nl, calls = llm.engine.runner.native_layers, []
    assert nl is not None
    fwd = nl.forward_sparse

    def counted(*a, **kw):
        calls.append(1)
        return fwd(*a, **kw)

    nl.forward_sparse = counted
    return calls


@pytest.mark.parametrize("name", ["squeezed", "shadowkv"])
@pytest.mark.parametrize("setting", ["chunked-no-prefix-cache", "preemption"])
def test_native_layers_equal_the_layer_path(tiny_llama_dir, monkeypatch, name, setting):
    """With native decode layers (the layer split around the policy's native selection + sparse
    attention) the greedy tokens and the counted reads equal the layer-by-layer path's."""
    from slimlm.model.quant.native_layers import ENV

    c = load(tiny_llama_dir).model.cfg
    kw = {"chunked-no-prefix-cache": dict(block_size=16, max_num_batched_tokens=16, enable_prefix_caching=False),
          "preemption": dict(block_size=8, max_num_batched_tokens=64,
                             kv_cache_bytes=20 * 2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4)}[setting]
    # preemption: 4 prompts of 9 blocks each in a pool of 20
    base = make_prompts(8, seed=7)
    prompts = shared_prompts() if setting != "preemption" else [(base[i] + base[i + 4])[:60] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = []
    for env in ("1", "0"):
        monkeypatch.setenv(ENV, env)
        llm = LLM(load(tiny_llama_dir), kv_policy=name, kv_policy_args=ARGS[name], **kw)
        calls = _native_layer_runs(llm) if env == "1" else None
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        st = llm.engine.policy.stats
        runs.append((outs, {k: st[k] for k in ("decode_rows", "keys_attended", "bytes_read", "bytes_full")}))
        if env == "1":
            assert len(calls) >= params.max_tokens - 1
            assert (llm.engine.scheduler.num_preemptions > 0) == (setting == "preemption")
        else:
            assert llm.engine.runner.native_layers is None
        assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    assert runs[0] == runs[1]
    assert runs[0][1]["bytes_read"] < runs[0][1]["bytes_full"]


def test_native_layers_refuse_the_key_tier(tiny_llama_dir):
    """ShadowKV's second tier keeps keys apart from the values: the layer-by-layer path serves."""
    from slimlm.model.quant.native_layers import unsupported

    r = LLM(load(tiny_llama_dir), kv_policy="shadowkv", kv_policy_args={**ARGS["shadowkv"], "key_share": 0.5}).engine.runner
    assert r.native_layers is None and "key tier" in unsupported(r.model, r.cache, r.paths, r.hooks, r.rope_ext)
