"""CacheBlend: 100 % recompute is a full prefill, 0 % is plain reuse (checked against chunks
computed alone at their offsets), the chunk store is LRU and never fails a request."""

from __future__ import annotations

import math

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.kvcache.chunk_store import ChunkStore
from slimlm.model.attention import attention
from slimlm.model.hub import load

HEAD, TAIL = [5, 6, 7], [8, 9, 11]
CHUNKS = [list(range(10 + 20 * i, 30 + 20 * i)) for i in range(3)]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(str(tiny_llama_dir))


def _prompt(order=(0, 1, 2)):
    return {"segments": [{"ids": HEAD}] + [{"chunk": {"ids": CHUNKS[i]}} for i in order] + [{"ids": TAIL}]}


def _flat(order=(0, 1, 2)):
    return HEAD + [t for i in order for t in CHUNKS[i]] + TAIL


SP = SamplingParams(temperature=0, max_tokens=8, logprobs=0)


def _lps(out):
    return torch.tensor([next(iter(d.values())) for d in out.outputs[0].logprobs])


def test_full_recompute_is_a_full_prefill(tiny):
    full = LLM(tiny, kv_cache_bytes="8M").generate([_flat()], SP, use_tqdm=False)[0]
    llm = LLM(tiny, kv_cache_bytes="8M", blend_recompute_ratio=1.0)
    llm.generate([_prompt((2, 1, 0))], SP, use_tqdm=False)  # fills the store in another order
    out = llm.generate([_prompt()], SP, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == full.outputs[0].token_ids
    assert torch.allclose(_lps(out), _lps(full), atol=1e-4)
    assert llm.engine.blender.store.stats["hits"] == 3


class ReuseReference:
    """Every chunk's KV computed alone at its offset positions; the other tokens fresh, seeing them."""

    def __init__(self, chunk_kv: dict, rows: torch.Tensor, T: int, scale: float):
        self.chunk_kv, self.rows, self.scale = chunk_kv, rows, scale
        idx = torch.arange(T)
        self.mask = (idx[None, :] <= idx[:, None])[None, None]

    def attend(self, layer, q, k, v, q_rows=None):
        K, V = k.clone(), v.clone()
        K[:, :, self.rows], V[:, :, self.rows] = self.chunk_kv[layer]
        return attention(q, K, V, self.mask, self.scale)


class Capture:
    def __init__(self, T, scale):
        idx = torch.arange(T)
        self.mask, self.scale, self.kv = (idx[None, :] <= idx[:, None])[None, None], scale, {}

    def attend(self, layer, q, k, v, q_rows=None):
        self.kv[layer] = (k, v)
        return attention(q, k, v, self.mask, self.scale)


def test_zero_recompute_is_plain_reuse(tiny):
    model, flat = tiny.model, _flat()
    parts: dict[int, list] = {}
    start = len(HEAD)
    with torch.no_grad():
        for c in CHUNKS:  # each chunk alone, directly at its offset (no rotation trick)
            cap = Capture(len(c), model.attn_scale)
            model(torch.tensor([c]), torch.arange(start, start + len(c))[None], cap)
            for layer, kv in cap.kv.items():
                parts.setdefault(layer, []).append(kv)
            start += len(c)
        chunk_kv = {layer: (torch.cat([k for k, _ in kv], 2), torch.cat([v for _, v in kv], 2))
                    for layer, kv in parts.items()}
        rows = torch.arange(len(HEAD), len(HEAD) + sum(map(len, CHUNKS)))
        ref = ReuseReference(chunk_kv, rows, len(flat), model.attn_scale)
        logits = model(torch.tensor([flat]), torch.arange(len(flat))[None], ref)[0, -1].log_softmax(-1)
    out = LLM(tiny, kv_cache_bytes="8M", blend_recompute_ratio=0.0,
              blend_chunk_context="none").generate([_prompt()], SP, use_tqdm=False)[0]
    assert out.outputs[0].token_ids[0] == int(logits.argmax())
    assert abs(float(_lps(out)[0]) - float(logits.max())) < 1e-4


def test_partial_recompute_counts_and_stays_between(tiny):
    llm = LLM(tiny, kv_cache_bytes="8M", blend_recompute_ratio=0.25)
    llm.generate([_prompt()], SP, use_tqdm=False)
    st = llm.engine.blender.stats
    n_prompt = len(_flat()) - 1
    assert st["recomputed_tokens"] == len(HEAD) + len(TAIL) - 1 + 15  # 25 % of the 60 chunk tokens
    assert st["probe_tokens"] == n_prompt


def _full_prefill(tiny):
    """The flat prompt's ids, its three 20-token chunk spans, the model, and the full prefill's
    captured KV (the reference)."""
    from slimlm.engine.cacheblend import CacheBlend, _Capture

    ids = _flat()[:-1]
    spans = [(len(HEAD) + 20 * i, len(HEAD) + 20 * (i + 1)) for i in range(3)]
    m = tiny.model
    full = _Capture(len(ids), m.attn_scale, m.device)
    with torch.inference_mode():
        CacheBlend(m, m.rotary, ChunkStore(1 << 24), 1.0)._run(ids, torch.arange(len(ids)), full)
    return ids, spans, m, full


@pytest.mark.parametrize("layer", [0, 1])
def test_layers_up_to_the_selection_layer_are_exact(tiny, layer):
    from slimlm.engine.cacheblend import CacheBlend

    ids, spans, m, full = _full_prefill(tiny)
    with torch.inference_mode():
        kv = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.25, select_layer=layer).prefill(ids, spans)
    for i, (k, v) in enumerate(kv):
        same = torch.allclose(k, full.kv[i][0], atol=1e-5) and torch.allclose(v, full.kv[i][1], atol=1e-5)
        assert same == (i <= layer), i  # the probe's layers are a full prefill; later ones are blended


def test_prefix_context_first_chunk_is_exact_and_keys_are_moved(tiny):
    """Chunks computed after the prompt's prefix (the default): at 0 % recompute the first chunk
    (which directly follows the prefix) has exactly the full prefill's KV in every layer, and
    every chunk's layer-0 keys (token and position only) equal the full prefill's: the RoPE move
    from the cached positions P.. to the chunk's offset is right. Computed alone, the first
    chunk's deeper KV differs (it starts cold)."""
    from slimlm.engine.cacheblend import CacheBlend

    ids, spans, m, full = _full_prefill(tiny)
    with torch.inference_mode():
        pre = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.0, chunk_context="prefix").prefill(ids, spans)
        cold = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.0, chunk_context="none").prefill(ids, spans)
    a, b = spans[0]
    for i, (k, v) in enumerate(pre):
        fk, fv = full.kv[i]
        assert torch.allclose(k[:, :, :b], fk[:, :, :b], atol=1e-5) and torch.allclose(v[:, :, :b], fv[:, :, :b], atol=1e-5)
    assert torch.allclose(pre[0][0], full.kv[0][0], atol=1e-5)  # all chunks moved right (layer 0)
    assert not torch.allclose(pre[-1][0][:, :, b:], full.kv[len(pre) - 1][0][:, :, b:], atol=1e-3)  # later chunks are reused
    assert not torch.allclose(cold[-1][0][:, :, a:b], full.kv[len(pre) - 1][0][:, :, a:b], atol=1e-3)


def test_prefix_context_keys_the_store_by_prefix(tiny):
    llm = LLM(tiny, kv_cache_bytes="8M", blend_recompute_ratio=0.0)
    llm.generate([_prompt()], SP, use_tqdm=False)
    store = llm.engine.blender.store
    assert store.stats["misses"] == 3 and len(store) == 3
    llm.generate([_prompt((2, 0, 1))], SP, use_tqdm=False)  # same prefix, other order: all hits
    assert store.stats["hits"] == 3
    other = {"segments": [{"ids": [4, 5]}] + [{"chunk": {"ids": c}} for c in CHUNKS] + [{"ids": TAIL}]}
    llm.generate([other], SP, use_tqdm=False)  # another prefix: new entries
    assert store.stats["misses"] == 6 and len(store) == 6


def test_store_is_lru_and_never_fails_a_request(tiny):
    cfg = tiny.model.cfg
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    llm = LLM(tiny, kv_cache_bytes="8M", chunk_store_bytes=per_token * 45, blend_recompute_ratio=0.0,
              blend_chunk_context="none")
    outs = llm.generate([_prompt()], SP, use_tqdm=False)  # 3 chunks of 20 tokens, room for 2
    store = llm.engine.blender.store
    assert len(store) == 2 and store.stats["evictions"] == 1 and CHUNKS[0] not in store
    assert len(outs[0].outputs[0].token_ids) == 8
    big = {"segments": [{"ids": HEAD}, {"chunk": {"ids": list(range(10, 70))}}, {"ids": TAIL}]}
    assert len(llm.generate([big], SP, use_tqdm=False)[0].outputs[0].token_ids) == 8  # larger than the store
    assert len(store) == 2


def test_chunk_store_unit():
    s = ChunkStore(100)
    kv = lambda n: (torch.zeros(n), torch.zeros(n))  # noqa: E731  8n bytes
    assert s.put([1], kv(5)) and s.put([2], kv(5))
    s.get([1])  # 1 is now most recent
    assert s.put([3], kv(5)) and [1] in s and [2] not in s
    assert not s.put([4], kv(20)) and len(s) == 2


@pytest.mark.parametrize("kw, msg", [
    ({"blend_recompute_ratio": 1.5}, r"blend_recompute_ratio must be in \[0, 1\]"),
    ({"blend_recompute_ratio": -0.1}, r"blend_recompute_ratio must be in \[0, 1\]"),
    ({"chunk_store_bytes": 0}, "chunk_store_bytes must be positive"),
    ({"blend_select_layer": -1}, "blend_select_layer must be a layer index"),
    ({"blend_chunk_context": "suffix"}, "blend_chunk_context must be prefix or none"),
])
def test_bad_settings(tiny, kw, msg):
    with pytest.raises(ValueError, match=msg):
        LLM(tiny, kv_cache_bytes="8M", **kw)


def test_chunks_and_sets_do_not_mix(tiny):
    llm = LLM(tiny, kv_cache_bytes="8M")
    bad = {"segments": [{"chunk": {"ids": [5, 6]}}, {"set": [{"ids": [7]}, {"ids": [8]}]}]}
    with pytest.raises(ValueError, match="both chunks and sets"):
        llm.generate([bad], SP, use_tqdm=False)


def _reference_blend(m, ids, spans, ratio, select_layer):
    """The blend written out plainly (its first form): every chunk computed after the prefix,
    moved per layer; a probe of layers 0 .. L in full; every layer of the selected rows run
    from their embeddings against the whole (T) key range with a dense causal mask."""
    from slimlm.model.rope import apply_rope, rotation

    T, P, L = len(ids), spans[0][0], select_layer
    layers = m.model.layers

    def run(tok, pos, attn, n_layers=len(layers)):
        h = m.embed(torch.tensor([tok]))
        cos, sin = m.rotary(pos[None], h.dtype)
        for layer in layers[:n_layers]:
            h = layer(h, cos, sin, attn)

    reused = [[torch.zeros(1, m.cfg.num_kv_heads, T, m.cfg.head_dim) for _ in range(2)] for _ in layers]
    in_chunk = torch.zeros(T, dtype=torch.bool)
    for a, b in spans:
        cap = Capture(P + b - a, m.attn_scale)
        run(ids[:P] + ids[a:b], torch.arange(P + b - a), cap)
        cos, sin = rotation(m.rotary.inv_freq, torch.full((1, b - a), a - P), m.dtype)
        for i, (k, v) in cap.kv.items():
            reused[i][0][:, :, a:b] = apply_rope(k[:, :, P:], cos, sin)
            reused[i][1][:, :, a:b] = v[:, :, P:]
        in_chunk[a:b] = True
    probe = Capture(T, m.attn_scale)
    run(ids, torch.arange(T), probe, L + 1)
    kf, vf = probe.kv[L]
    dev = ((kf - reused[L][0]) ** 2).sum((0, 1, 3)) + ((vf - reused[L][1]) ** 2).sum((0, 1, 3))
    want = math.ceil(ratio * int(in_chunk.sum()) - 1e-9)
    top = dev.masked_fill(~in_chunk, float("-inf")).topk(want).indices
    sel = torch.cat([(~in_chunk).nonzero()[:, 0], top]).sort().values
    for i in range(L + 1):
        reused[i] = list(probe.kv[i])
    mask = (torch.arange(T)[None, :] <= sel[:, None])[None, None]
    out = {}

    class Blend:
        def attend(self, layer, q, k, v, q_rows=None):
            K, V = reused[layer][0].clone(), reused[layer][1].clone()
            K[:, :, sel], V[:, :, sel] = k, v
            out[layer] = (K, V)
            return attention(q, K, V, mask, m.attn_scale)

    run([ids[i] for i in sel.tolist()], sel, Blend())
    return [out[i] for i in range(len(layers))]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("tiny4")
    # head size 64: the native kernels serve it
    make_hf_model(path, num_hidden_layers=4, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    return load(str(path))


@pytest.mark.parametrize("ratio, layer", [(0.25, 0), (0.25, 2), (0.6, 1)])
def test_fast_blend_equals_the_plain_one(tiny4, ratio, layer, monkeypatch):
    """The blend's fast path (probe layers not run twice, the selection layer's probe only
    projecting keys and values, one buffer for all layers moved per chunk in one rotation,
    query blocks of 8 rows each over its causal key range) gives the plain algorithm's KV."""
    from slimlm.engine import cacheblend

    monkeypatch.setattr(cacheblend, "Q_BLOCK", 8)  # several query blocks on this short prompt
    ids, spans, m, _ = _full_prefill(tiny4)
    with torch.inference_mode():
        ref = _reference_blend(m, ids, spans, ratio, layer)
        kv = cacheblend.CacheBlend(m, m.rotary, ChunkStore(1 << 24), ratio, select_layer=layer).prefill(ids, spans)
    for i, ((k, v), (rk, rv)) in enumerate(zip(kv, ref)):
        assert torch.allclose(k, rk, atol=1e-5) and torch.allclose(v, rv, atol=1e-5), i


def test_gradual_filtering_keeps_the_ratio_after_one_more_layer(tiny4):
    """Gradual filtering (paper section 4.3): 50 % of the chunk rows selected at layer 1 run
    through layer 2; from layer 3 on only 25 % (chosen among them) plus the non-chunk rows are
    fresh. A first ratio equal to the ratio is the one-selection blend."""
    from slimlm.engine.cacheblend import CacheBlend

    ids, spans, m, _ = _full_prefill(tiny4)
    n_other = len(ids) - 60
    with torch.inference_mode():
        one = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.25).prefill(ids, spans)
        same = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.25, first_ratio=0.25).prefill(ids, spans)
        cb = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.25, first_ratio=0.5)
        grad = cb.prefill(ids, spans)
        K, _, _ = cb.reused_kv(ids, spans)  # the chunks' moved KV, before any recompute
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, same))
    changed = [(grad[i][0][0].transpose(0, 1) != K[i, :len(ids)]).any(-1).any(-1) for i in (2, 3)]  # (T,) rows
    fresh = [set(c.nonzero()[:, 0].tolist()) for c in changed]
    assert len(fresh[0]) == n_other + 30 and len(fresh[1]) == n_other + 15 and fresh[1] <= fresh[0]
    assert cb.stats["recomputed_tokens"] == round((2 * (n_other + 30) + 2 * (n_other + 15)) / 4)


def test_native_blend_attention_equals_pytorch(tiny4):
    """The blend's attention through the native prefill kernel (every row from the first
    selected one queries, the pool read in blocks) equals PyTorch's over the selected rows."""
    from slimlm import kernels
    from slimlm.engine.cacheblend import CacheBlend

    lib = kernels.load("paged_prefill")
    if lib is None:
        pytest.skip("no native kernels here")
    ids, spans, m, _ = _full_prefill(tiny4)
    with torch.inference_mode():
        cb = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.3, native_prefill=lib)
        assert cb.native is not None
        fast = cb.prefill(ids, spans)
        ref = CacheBlend(m, m.rotary, ChunkStore(1 << 24), 0.3).prefill(ids, spans)
    for (k, v), (rk, rv) in zip(fast, ref):
        assert torch.allclose(k, rk, atol=1e-5) and torch.allclose(v, rv, atol=1e-5)
