"""MiniCache inside continuous batching: merged pairs share one storage (real memory saved),
and the engine equals a dense, unbatched MiniCache fed the same chunks; retention, prefix
caching, preemption and the bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.errors import SlimLMError
from slimlm.kvcache.codec import KV_CODECS
from slimlm.kvcache.merge import MAGNITUDE_DTYPE, slerp
from slimlm.model.hub import load
from slimlm.model.rope import apply_rope
from tests.conftest import make_hf_model
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-4")
    make_hf_model(path, "llama", seed=3, num_hidden_layers=4)
    return load(path)


def test_slerp_keeps_unit_directions_and_the_midpoint():
    torch.manual_seed(0)
    a, b = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    e, n0, n1, dist = slerp(a, b, 0.5)
    assert torch.allclose(e.norm(dim=-1), torch.ones(5, 2), atol=1e-5)
    assert torch.allclose(n0, a.norm(dim=-1)) and torch.allclose(n1, b.norm(dim=-1))
    u0, u1 = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    mid = (u0 + u1) / (u0 + u1).norm(dim=-1, keepdim=True)  # t = 0.5: the bisector
    assert torch.allclose(e, mid, atol=1e-5)
    assert torch.allclose(dist, torch.arccos((u0 * u1).sum(-1).clamp(-1, 1)) / math.pi, atol=1e-6)
    e0 = slerp(a, b, 0.0)[0]
    assert torch.allclose(e0, u0, atol=1e-5)
    same = slerp(a, 3 * a, 0.3)  # parallel pair: no division by sin(0)
    assert torch.allclose(same[0], u0, atol=1e-5) and float(same[3].max()) < 1e-3


class DenseMiniCache:
    """One sequence, no paging: per layer the K/V each layer reads, as (Hkv, S, d) tensors.
    Both layers of a pair attend their new chunk unmerged (as stored by the codec); once the
    second layer has its states, the chunk's tokens are merged (or retained, first come first
    served per block of ``bs`` positions, ``rows`` per block) and both layers read the merged
    rows from the next chunk on."""

    def __init__(self, lm, pairs, t, threshold, rows, bs, codec="auto"):
        self.lm, self.t, self.threshold, self.rows, self.bs = lm, t, threshold, rows, bs
        self.codecs = {r: KV_CODECS.get(codec)(lm.model.dtype, lm.model.cfg.head_dim, r) for r in ("k", "v")}
        self.second = {b: a for a, b in pairs}
        self.mu = None  # the key offset per layer, as the engine gives its storages (a pair: their mean)
        if self.codecs["k"].wants_key_offsets:
            from tests.kvcache.test_codecs import engine_offsets

            self.mu = engine_offsets(lm)
            for a, b in pairs:
                self.mu[a] = self.mu[b] = torch.stack([self.mu[a], self.mu[b]]).mean(0)
        cfg = lm.model.cfg
        H, d = cfg.num_kv_heads, cfg.head_dim
        self.K = [torch.zeros(H, 0, d) for _ in range(cfg.num_layers)]
        self.V = [torch.zeros(H, 0, d) for _ in range(cfg.num_layers)]
        self.used: dict[int, dict[int, int]] = {b: {} for b in self.second}  # pair -> block -> rows taken
        self.retained = self.merged = 0
        self.seen = 0

    def stored(self, x, role="k", layer=None):
        """(Hkv, T, d) of ``layer`` as the codec of keys or values gives it back (write, then read)."""
        H, T, d = x.shape
        codec = self.codecs[role]
        parts = codec.allocate(1, T, H, "cpu")
        if role == "k" and self.mu is not None:
            codec.set_offset(parts, self.mu[layer])
        codec.write(parts, torch.arange(T), x.transpose(0, 1))
        return codec.read(parts, torch.tensor([0]))[0].transpose(0, 1)

    def _merge(self, layer, x0k, x0v, x1k, x1v):
        """(Hkv, T, d) states of both layers (the first as stored) -> what each reads."""
        ek, nk0, nk1, dk = slerp(x0k.transpose(0, 1), x1k.transpose(0, 1), self.t)  # (T, H, d), (T, H)
        ev, nv0, nv1, dv = slerp(x0v.transpose(0, 1), x1v.transpose(0, 1), self.t)
        ek, ev = (self.stored(e.transpose(0, 1), r, layer).transpose(0, 1)
                  for e, r in ((ek, "k"), (ev, "v")))  # via the codec
        r16 = lambda n: n.to(MAGNITUDE_DTYPE).float()[..., None]  # noqa: E731  (magnitudes kept in fp16)
        out = [ek * r16(nk0), ev * r16(nv0), ek * r16(nk1), ev * r16(nv1)]
        raw = [x.transpose(0, 1) for x in (x0k, x0v, self.stored(x1k, "k", layer), self.stored(x1v, "v"))]
        used = self.used[layer]
        for j in range(x0k.shape[1]):
            block = (self.seen + j) // self.bs
            far = max(float(dk[j].max()), float(dv[j].max())) > self.threshold
            if far and used.get(block, 0) < self.rows:
                used[block] = used.get(block, 0) + 1
                for o, r in zip(out, raw):
                    o[j] = r[j]
                self.retained += 1
            else:
                self.merged += 1
        return [o.transpose(0, 1) for o in out]

    @torch.no_grad()
    def chunk(self, tokens):
        m = self.lm.model
        cfg = m.cfg
        T, d, G = len(tokens), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        pos = torch.arange(self.seen, self.seen + T)[None]
        h = m.embed(torch.tensor([tokens]))
        cos, sin = m.rotary(pos, h.dtype)
        raw = {}
        for i, layer in enumerate(m.model.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = apply_rope(att.q_proj(x).view(1, T, -1, d).transpose(1, 2), cos, sin)[0]  # (Hq, T, d)
            k = apply_rope(att.k_proj(x).view(1, T, -1, d).transpose(1, 2), cos, sin)[0]  # (Hkv, T, d)
            v = att.v_proj(x).view(1, T, -1, d).transpose(1, 2)[0]
            if i not in self.second:  # what the layer reads back of its own chunk
                k, v = self.stored(k, "k", i), self.stored(v, "v")
            raw[i] = (k, v)
            own = None
            if i in self.second:  # the pair's chunk is merged now: later reads see the merged rows
                a = self.second[i]
                own = self.stored(k, "k", i), self.stored(v, "v")  # but this chunk reads its own rows
                ka, va, k, v = self._merge(i, *raw[a], k, v)
                self.K[a][:, -T:], self.V[a][:, -T:] = ka, va
            K, V = torch.cat([self.K[i], k], 1), torch.cat([self.V[i], v], 1)
            self.K[i], self.V[i] = K, V
            if own is not None:
                K, V = torch.cat([K[:, :-T], own[0]], 1), torch.cat([V[:, :-T], own[1]], 1)
            S = K.shape[1]
            mask = torch.ones(T, S, dtype=torch.bool)
            mask[:, S - T:] = torch.ones(T, T, dtype=torch.bool).tril()
            s = (q @ K.repeat_interleave(G, 0).transpose(-1, -2)) * m.attn_scale  # (Hq, T, S)
            out = s.masked_fill(~mask, float("-inf")).softmax(-1) @ V.repeat_interleave(G, 0)  # (Hq, T, d)
            h = h + att.o_proj(out.transpose(0, 1).reshape(1, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.seen += T
        return m.head(h[:, -1:])[0, -1]


ARGS = {"start": 1, "threshold": 0.42, "retain": 0.25}  # layers (1, 2) merge; about half the tokens retained


def run_logged(llm, prompts, params):
    """Run the engine, recording every chunk each sequence was given: (start, length)."""
    eng = llm.engine
    real = eng.runner.execute
    log: dict[str, list[tuple[int, int]]] = {}

    def spy(out):
        rid = {s.seq_id: s.request.request_id for s in eng.scheduler.running}
        for c in out.chunks:
            log.setdefault(rid[c.seq_id], []).append((c.start, len(c.token_ids)))
        return real(out)

    eng.runner.execute = spy
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, [log[o.request_id] for o in outs]


def check_against_dense(lm, prompt, out_ids, chunks, bs, codec="auto"):
    """Replay the engine's chunks on a dense MiniCache; every sampled token must be its argmax.
    A chunk that starts past what the reference holds follows a prefix-cache hit (the cached
    blocks were computed from position 0 in one chunk); a chunk at 0 restarts it (preemption)."""
    ids = list(prompt) + list(out_ids)
    ref = None
    merged = retained = 0
    for start, n in chunks:
        if ref is None or start < ref.seen:
            if ref is not None:
                merged, retained = merged + ref.merged, retained + ref.retained
            ref = DenseMiniCache(lm, [(1, 2)], 0.5, ARGS["threshold"], math.ceil(ARGS["retain"] * bs), bs, codec)
            if start:
                ref.chunk(ids[:start])
        elif start > ref.seen:
            ref.chunk(ids[ref.seen : start])
        logits = ref.chunk(ids[start : start + n])
        end = start + n
        if end >= len(prompt) and end < len(ids):
            assert int(logits.argmax()) == ids[end], f"token at {end}: {logits.topk(2)} vs {logits[ids[end]]}"
    return merged + ref.merged, retained + ref.retained


SCENARIOS = {
    "chunks-16": dict(max_num_batched_tokens=16, block_size=8, enable_prefix_caching=False),
    "chunks-64-pytorch": dict(max_num_batched_tokens=64, block_size=16, native_kernels=False,
                              enable_prefix_caching=False),
    "prefix-caching": dict(block_size=8),
    "preemption": dict(block_size=8, max_num_batched_tokens=32, enable_prefix_caching=False, blocks=40),
    "int8": dict(block_size=8, max_num_batched_tokens=32, enable_prefix_caching=False, kv_cache_dtype="int8"),
    "int4-preemption": dict(block_size=8, max_num_batched_tokens=32, enable_prefix_caching=False, blocks=40,
                            kv_cache_dtype="int4"),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_engine_equals_dense_minicache_on_the_same_chunks(tiny4, name):
    settings = dict(SCENARIOS[name])
    blocks = settings.pop("blocks", None)
    if blocks:
        bpb = LLM(tiny4, kv_policy="minicache", kv_policy_args=ARGS, **settings).engine.bytes_per_block
        settings["kv_cache_bytes"] = blocks * bpb
    prompts = make_prompts(12, seed=5)
    bodies = [(p * 9)[:80] for p in prompts[1::2]]  # distinct, so every prefix hit is the shared prefix
    prompts = [prompts[0][:40] + b for b in bodies]  # a shared 40-token prefix
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(tiny4, kv_policy="minicache", kv_policy_args=ARGS, **settings)
    eng = llm.engine
    assert [s.storage for s in eng.spec.layers] == [0, 1, 1, 2]
    outs, logs = run_logged(llm, prompts, params)
    assert eng.pool.num_free() == eng.pool.num_blocks
    merged = retained = 0
    for prompt, out, chunks in zip(prompts, outs, logs):
        assert len(out.outputs[0].token_ids) == 12
        m, r = check_against_dense(tiny4, prompt, out.outputs[0].token_ids, chunks, settings["block_size"],
                                   settings.get("kv_cache_dtype", "auto"))
        merged, retained = merged + m, retained + r
    assert retained > 0 and merged > retained  # both paths ran
    if name == "prefix-caching":
        assert eng.stats["computed_prompt_tokens"] < eng.stats["prompt_tokens"]
    if "preemption" in name:
        assert eng.scheduler.num_preemptions > 0


def test_merged_pairs_really_share_memory(tiny4):
    full = LLM(tiny4, block_size=8, kv_cache_bytes="1M").engine
    mc = LLM(tiny4, block_size=8, kv_cache_bytes="1M", kv_policy="minicache",
             kv_policy_args={"start": 0, "retain": 0.125}).engine
    assert mc.spec.num_storages == 2 and len(mc.cache.k) == 2
    row = full.spec.bytes_per_token() // 4  # one layer's K and V per token
    mag = 2 * 2 * 2 * 2  # per pair: k and v magnitudes of both layers, fp16, 2 heads
    assert mc.bytes_per_block == 8 * (2 * row + 2 * (mag + 1)) + 2 * row  # 2 pairs, 1 retention row (K and V) each
    assert mc.pool.num_blocks > 1.6 * full.pool.num_blocks
    resident = sum(t.numel() * t.element_size() for t in mc.cache._parts())
    assert resident == mc.pool.num_blocks * mc.bytes_per_block  # the accounting is what is allocated


def test_full_retention_is_the_full_cache(tiny4):
    prompts = make_prompts(6, seed=5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in LLM(tiny4, block_size=8).generate(prompts, params, use_tqdm=False)]
    keep_all = {"start": 0, "threshold": 0.0, "retain": 1.0}  # every token retained: exactly the full cache
    got = LLM(tiny4, block_size=8, kv_policy="minicache", kv_policy_args=keep_all).generate(prompts, params,
                                                                                              use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == base


@pytest.mark.parametrize("args,msg", [({"start": 3}, "no pair"), ({"start": 9}, "no pair"), ({"t": 2}, "t must"),
                                      ({"threshold": -1}, "threshold"), ({"start": "x"}, "start must")])
def test_bad_settings_are_one_line_errors(tiny4, args, msg):
    with pytest.raises((ValueError, SlimLMError), match=msg):
        LLM(tiny4, kv_policy="minicache", kv_policy_args=args)


def test_speculative_decoding_is_refused(tiny4):
    with pytest.raises(SlimLMError, match="cannot roll back"):
        LLM(tiny4, kv_policy="minicache", kv_policy_args={"start": 0}, speculative="draft")
