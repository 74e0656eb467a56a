"""Sparse prefill (vertical-slash): the full pattern is dense attention exactly; a sparse pattern
computes what its definition says, pair by pair (also composed with DCA); bad settings are one-line
errors."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.sparse_prefill import VerticalSlash
from slimlm.errors import SlimLMError
from slimlm.model.hub import load

FULL = {"vertical": 1 << 20, "min_keys": 1}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(str(tiny_llama_dir))


def _lp(out) -> torch.Tensor:
    return torch.tensor([next(iter(d.values())) for d in out.prompt_logprobs[1:]])


@pytest.mark.parametrize("budget", [2048, 37])
def test_full_pattern_equals_dense(tiny, budget):
    prompts = [[(7 * i + j) % 300 + 3 for i in range(n)] for j, n in enumerate((40, 150))]
    sp = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0)
    dense = LLM(tiny, kv_cache_bytes="8M", max_num_batched_tokens=budget).generate(prompts, sp, use_tqdm=False)
    sparse = LLM(tiny, kv_cache_bytes="8M", max_num_batched_tokens=budget, sparse_prefill="vertical-slash",
                 sparse_prefill_args=FULL).generate(prompts, sp, use_tqdm=False)
    for a, b in zip(dense, sparse):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert torch.allclose(_lp(a), _lp(b), atol=1e-5)


def test_sparse_pattern_follows_its_definition():
    torch.manual_seed(0)
    T, S, d = 40, 100, 16  # a chunk of 40 queries at positions 60..99 over 100 keys
    q, k, v = torch.randn(1, 4, T, d), torch.randn(1, 2, S, d), torch.randn(1, 2, S, d)
    qp, kp = torch.arange(S - T, S)[None], torch.arange(S)[None]
    vs = VerticalSlash(vertical=7, slash=9, local=3, probe=8, block=16, min_keys=1)
    out = vs.attend(q, k, v, qp, kp, 0.25)
    kx, vx = k[0].repeat_interleave(2, 0), v[0].repeat_interleave(2, 0)
    _, _, is_v, is_s = vs._pattern(q[0], kx, qp[0], kp[0], kp[0] >= 0, 0.25)
    assert int(is_v.sum(1).max()) == 7 and int(is_s.sum(1).max()) == 9 and bool(is_s[:, :3].all())
    dist = qp[0][:, None] - kp[0][None, :]  # (T, S)
    allow = (dist >= 0)[None] & (is_v[:, None, :] | is_s.gather(1, dist.clamp(min=0).flatten()[None].expand(4, -1))
                                 .view(4, T, S))
    scores = (q[0] @ kx.transpose(-1, -2) * 0.25).masked_fill(~allow, float("-inf"))
    ref = scores.softmax(-1) @ vx
    assert torch.allclose(out[0], ref, atol=1e-5)
    assert allow.float().mean() < 0.5 * (dist >= 0).float().mean()  # it is sparse
    # a block's candidates: the keys some query of the block attends, each scored for all its queries
    scored = sum((e - a) * int(allow[:, a:e].any(1).sum()) for a, e in ((0, 16), (16, 32), (32, 40)))
    assert vs.stats == {"computed": int(allow.sum()), "causal": 4 * int((dist >= 0).sum()), "scored": scored}
    whole = VerticalSlash(vertical=S, min_keys=1, block=16)
    full = whole.attend(q, k, v, qp, kp, 0.25)
    assert whole.stats["computed"] == whole.stats["causal"]
    dense = (q[0] @ kx.transpose(-1, -2) * 0.25).masked_fill(dist < 0, float("-inf")).softmax(-1) @ vx
    assert torch.allclose(full[0], dense, atol=1e-5)


def test_short_chunks_stay_dense(tiny):
    p = [[(11 * i) % 300 + 3 for i in range(60)]]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    dense = LLM(tiny, kv_cache_bytes="8M").generate(p, sp, use_tqdm=False)[0]
    small = {"vertical": 2, "slash": 2, "local": 1}
    short = LLM(tiny, kv_cache_bytes="8M", sparse_prefill="vertical-slash",
                sparse_prefill_args={**small, "min_keys": 1000}).generate(p, sp, use_tqdm=False)[0]
    assert torch.equal(_lp(dense), _lp(short))
    kept = LLM(tiny, kv_cache_bytes="8M", sparse_prefill="vertical-slash",  # every layer kept dense
               sparse_prefill_args={**small, "min_keys": 1, "dense_layers": 99}).generate(p, sp, use_tqdm=False)[0]
    assert torch.equal(_lp(dense), _lp(kept))
    sparse = LLM(tiny, kv_cache_bytes="8M", sparse_prefill="vertical-slash",
                 sparse_prefill_args={**small, "min_keys": 1}).generate(p, sp, use_tqdm=False)[0]
    assert not torch.allclose(_lp(dense), _lp(sparse), atol=1e-3)  # a 4-key pattern changes the scores


@pytest.mark.parametrize("kw, msg", [
    ({"sparse_prefill": "diagonal"}, "known: vertical-slash"),
    ({"sparse_prefill": "vertical-slash", "sparse_prefill_args": {"vertical": 0}}, "positive integer"),
    ({"sparse_prefill": "vertical-slash", "sparse_prefill_args": {"slash": 4, "local": 8}}, "local must be"),
    ({"sparse_prefill": "vertical-slash", "sparse_prefill_args": {"width": 3}}, "unexpected keyword"),
    ({"sparse_prefill": "vertical-slash", "sparse_prefill_args": {"dense_layers": -1}}, "dense_layers must be"),
    ({"sparse_prefill_args": {"vertical": 3}}, "without sparse_prefill"),
    ({"sparse_prefill": "vertical-slash", "kv_policy": "sink"}, "cannot be combined"),
])
def test_bad_settings_are_one_line_errors(tiny, kw, msg):
    with pytest.raises(SlimLMError, match=msg):
        LLM(tiny, kv_cache_bytes="8M", **kw)


# ---------------------------------------------------------------------- the native kernel's path
SMALL = {"vertical": 5, "slash": 6, "local": 2, "probe": 8, "block": 16, "min_keys": 24}


def _native(llm):
    return llm.engine.runner.paths.sparse_prefill_native


@pytest.mark.parametrize("dtype, budget", [("float32", 2048), ("float32", 48), ("bfloat16", 48)])
def test_native_path_equals_pytorch_path(tiny, tiny_llama_dir, dtype, budget):
    """Same pattern, same pairs: the kernel (reading the pool in place) against the PyTorch
    gathers, whole prompts and chunked prefill (chunks of 48 tokens over earlier context), GQA."""
    if not kernels_build():
        pytest.skip("no C compiler / AVX-512: the PyTorch path is the only one")
    model = load(str(tiny_llama_dir), dtype=dtype)
    prompts = [[(7 * i + j) % 300 + 3 for i in range(n)] for j, n in enumerate((130, 90))]
    sp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    runs = {}
    for native in (True, False):
        llm = LLM(model, kv_cache_bytes="8M", max_num_batched_tokens=budget, native_kernels=native,
                  sparse_prefill="vertical-slash", sparse_prefill_args=SMALL)
        assert (_native(llm) is not None) == native
        runs[native] = (llm.generate(prompts, sp, use_tqdm=False), dict(llm.engine.runner.paths.sparse_prefill.stats))
    (fast, st_fast), (ref, st_ref) = runs[True], runs[False]
    tol = 1e-5 if dtype == "float32" else 0.02  # bf16: the model's rounding between layers (5e-3 measured)
    for a, b in zip(fast, ref):
        assert torch.allclose(_lp(a), _lp(b), atol=tol)
        if dtype == "float32":
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert st_fast["computed"] == st_ref["computed"] and st_fast["causal"] == st_ref["causal"]  # the same pattern
    assert st_fast["computed"] < st_fast["causal"]  # and a sparse one
    assert st_fast["computed"] <= st_fast["scored"] == st_ref["scored"]


def kernels_build() -> bool:
    from slimlm import kernels

    lib = kernels.load("sparse_prefill")
    return lib is not None and bool(lib.slimlm_sparse_prefill_supported(16))


def test_native_full_pattern_equals_dense(tiny):
    if not kernels_build():
        pytest.skip("no C compiler / AVX-512: the PyTorch path is the only one")
    p = [[(5 * i) % 300 + 3 for i in range(120)]]
    sp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    dense = LLM(tiny, kv_cache_bytes="8M", max_num_batched_tokens=40).generate(p, sp, use_tqdm=False)[0]
    llm = LLM(tiny, kv_cache_bytes="8M", max_num_batched_tokens=40, sparse_prefill="vertical-slash",
              sparse_prefill_args={**FULL, "block": 16})
    full = llm.generate(p, sp, use_tqdm=False)[0]
    assert _native(llm) is not None
    assert full.outputs[0].token_ids == dense.outputs[0].token_ids
    assert torch.allclose(_lp(full), _lp(dense), atol=1e-5)


@pytest.mark.parametrize("kw, native", [
    ({}, True), ({"kv_cache_dtype": "int8"}, True),
    ({"native_kernels": False}, False),
    ({"kv_cache_dtype": "float16"}, False),  # a pool format the kernels do not read
    ({"kv_cache_dtype": "int4"}, False),  # int4 keys are stored rotated: the probe would need them unrotated
])
def test_native_path_is_chosen_where_it_applies(tiny, kw, native):
    if native and not kernels_build():
        pytest.skip("no C compiler / AVX-512: the PyTorch path is the only one")
    llm = LLM(tiny, kv_cache_bytes="8M", sparse_prefill="vertical-slash", sparse_prefill_args=SMALL, **kw)
    assert (_native(llm) is not None) == native
    out = llm.generate([[(3 * i) % 300 + 3 for i in range(40)]], SamplingParams(temperature=0, max_tokens=1),
                       use_tqdm=False)[0]  # either path serves the sparse chunk
    assert len(out.outputs[0].token_ids) == 1
    assert llm.engine.runner.paths.sparse_prefill.stats["computed"] > 0


# ------------------------------------------------------------------ composed with Dual Chunk Attention
DCA = {"chunk_size": 64, "local_window": 8}  # chunks of 56 tokens on the tiny model (trained to 256)


@pytest.mark.parametrize("native", [False, True])
def test_full_pattern_with_dca_equals_dca(tiny, native):
    if native and not kernels_build():
        pytest.skip("no C compiler / AVX-512: the PyTorch path is the only one")
    budget = 37  # chunked prefill: the chunks' context from the paged cache
    p = [[(7 * i + 1) % 300 + 3 for i in range(150)]]  # intra, successive and inter-chunk pairs
    sp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    kw = dict(kv_cache_bytes="8M", max_num_batched_tokens=budget, rope_extension="dca", rope_extension_args=DCA,
              native_kernels=native)
    dca = LLM(tiny, **kw).generate(p, sp, use_tqdm=False)[0]
    both = LLM(tiny, **kw, sparse_prefill="vertical-slash", sparse_prefill_args=FULL)
    assert (_native(both) is not None) == native  # DCA's key ranges on the kernel, or the PyTorch pattern path
    out = both.generate(p, sp, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == dca.outputs[0].token_ids
    assert torch.allclose(_lp(dca), _lp(out), atol=1e-5)
    sparse = LLM(tiny, **kw, sparse_prefill="vertical-slash", sparse_prefill_args={**SMALL, "min_keys": 1}) \
        .generate(p, sp, use_tqdm=False)[0]
    assert not torch.allclose(_lp(dca), _lp(sparse), atol=1e-3)  # a sparse pattern is applied


@pytest.mark.parametrize("dtype,scale", [("float32", None), ("bfloat16", None), ("float32", "yarn")])
def test_sparse_dca_native_equals_its_pytorch_path(tiny_llama_dir, dtype, scale):
    """A sparse pattern under DCA: the kernel's key ranges (one call per range with its query
    rotation, merged by log-sum-exps) attend what the PyTorch pattern path attends, and count the
    same pairs; with ``logit_scale="yarn"`` past the trained 256 tokens, every range's queries
    (the own chunk's included) carry the length factor on both paths."""
    if not kernels_build():
        pytest.skip("no C compiler / AVX-512: the PyTorch path is the only one")
    from slimlm.model.hub import load

    model = load(str(tiny_llama_dir), dtype=dtype)
    p = [[(11 * i + 5) % 300 + 3 for i in range(170 if scale is None else 300)]]
    args = DCA if scale is None else {**DCA, "logit_scale": scale}
    sp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    res = []
    for native in (False, True):
        llm = LLM(model, kv_cache_bytes="8M", max_num_batched_tokens=48, rope_extension="dca",
                  rope_extension_args=args, sparse_prefill="vertical-slash",
                  sparse_prefill_args={**SMALL, "min_keys": 1}, native_kernels=native)
        assert (_native(llm) is not None) == native
        res.append((llm.generate(p, sp, use_tqdm=False)[0], dict(llm.engine.runner.paths.sparse_prefill.stats)))
    (a, sa), (b, sb) = res
    assert sa["computed"] == sb["computed"] > 0
    tol = 1e-5 if dtype == "float32" else 0.02  # bf16: 0.0076 measured
    assert torch.allclose(_lp(a), _lp(b), atol=tol), float((_lp(a) - _lp(b)).abs().max())
    if dtype == "float32":
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_sparse_pattern_with_dca_follows_its_definition():
    """Under DCA the probe picks the pattern from DCA's attention, and each query attends its
    pattern's keys with the rotation DCA assigns the pair (== DCA attention under the mask)."""
    from slimlm.model.rope_extension import DualChunk, dca_attention, dca_queries

    torch.manual_seed(0)
    T, S, d, G = 40, 100, 16, 2  # queries at 60..99 over 100 keys; chunks of 28: all three ranges
    dc, inv = DualChunk(32, 4, logit_scale=1.2), 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    q, k, v = torch.randn(1, 4, T, d), torch.randn(1, 2, S, d), torch.randn(1, 2, S, d)
    qp, kp = torch.arange(S - T, S)[None], torch.arange(S)[None]
    causal = (kp[0][None, :] <= qp[0][:, None])  # (T, S)
    vs = VerticalSlash(vertical=7, slash=9, local=3, probe=8, block=16, min_keys=1)
    out = vs.attend(q, k, v, qp, kp, 0.25, (dc, inv))
    # the probe: DCA's attention weights of the last 8 queries (values = one-hot keys, d at a time)
    eye = torch.eye(S + d)[:S]
    probe = torch.cat([dca_attention(q[:, :, -8:], k, eye[None, None, :, b : b + d].expand(1, 2, -1, -1),
                                     causal[None, None, -8:], qp[:, -8:], kp, dc, inv, 0.25)[0]
                       for b in range(0, S, d)], -1)[..., :S]  # (Hq, 8, S)
    cols = probe.sum(1).topk(7, -1).indices.sort(-1).values
    qf, kx = q[0], k[0].repeat_interleave(G, 0)
    rot = (*(x[0] for x in dca_queries(q, qp, dc, inv)), dc.chunk_len)
    got_cols, _, is_v, is_s = vs._pattern(qf, kx, qp[0], kp[0], kp[0] >= 0, 0.25 * 1.2, rot)
    assert torch.equal(got_cols.sort(-1).values, cols)
    dist = qp[0][:, None] - kp[0][None, :]
    allow = causal[None] & (is_v[:, None, :] | is_s.gather(1, dist.clamp(min=0).flatten()[None].expand(4, -1))
                            .view(4, T, S))
    assert allow.float().mean() < 0.5 * causal.float().mean()  # it is sparse
    for h in range(4):  # DCA attention under head h's mask
        ref = dca_attention(q[:, h : h + 1], k[:, h // G : h // G + 1], v[:, h // G : h // G + 1], allow[h][None, None],
                            qp, kp, dc, inv, 0.25)
        assert torch.allclose(out[:, h : h + 1], ref, atol=1e-5), h


def _pattern_full_size(vs, qf, kx, qp, kp, valid, scale, rot=None):
    """The probe as first written (session 7-11): every (Hq, probe, S) score tensor materialized
    afresh, all three DCA rotations over every key, then picked; the reference the reused-buffer
    probe must reproduce bit for bit."""
    from slimlm.model.rope_extension import dca_pick

    Hq, T, d = qf.shape
    Hkv, S = kx.shape[0], kx.shape[1]
    m = min(vs.probe, T)
    pq = qp[T - m :]
    causal = ((pq[:, None] - kp[None, :]) >= 0) & valid[None, :]

    def logits(qx):
        return ((qx[:, T - m :] * scale).reshape(Hkv, Hq // Hkv * m, d) @ kx.transpose(-1, -2)).view(Hq, m, S)

    if rot is None:
        att = logits(qf)
    else:
        c = rot[3]
        att = dca_pick(pq[:, None] // c - kp[None, :].clamp(min=0) // c, *(logits(x) for x in rot[:3]))
    att = att.masked_fill_(~causal, float("-inf")).softmax(-1)
    n_off = int(qp[-1]) + 1
    vert = att.sum(1).masked_fill(~valid, -1.0)
    cols = vert.topk(min(vs.vertical, S), -1).indices
    slash = torch.zeros(Hq, n_off, dtype=att.dtype)
    for r, p in enumerate(pq.tolist()):
        slash[:, : p + 1] += att[:, r, : p + 1].flip(-1)
    slash[:, : vs.local] = float("inf")
    offs = slash.topk(min(vs.slash, n_off), -1).indices
    return cols, offs, att


@pytest.mark.parametrize("S, T, c, pad", [
    (3000, 512, None, 0),    # no DCA, GQA heads
    (3000, 512, None, 200),  # attend's k_pos: arange then -1 padding
    (5000, 700, 1200, 0),    # DCA: inter / successive / intra key ranges
    (4801, 1, 1200, 0),      # DCA: one probe row, its own key range 1 key wide (a matrix-vector product alone)
    (4801, 300, 1200, 0),    # DCA: the same range, the probe's rows straddling a DCA chunk boundary (4800)
    (4830, 300, 1200, 0),    # DCA: the probe's rows straddle 4800
    (4830, 300, 1200, 17),   # the same with padding
])
def test_probe_with_reused_buffers_picks_the_same_pattern(S, T, c, pad):
    from slimlm.model.rope_extension import DualChunk, dca_queries

    torch.manual_seed(S + T + pad)
    Hq, Hkv, d = 9, 3, 64
    q, k = torch.randn(1, Hq, T, d) * 2, torch.randn(Hkv, S + pad, d)
    k[:, S:] = 0
    qp = torch.arange(S - T, S)
    kp = torch.cat([torch.arange(S), torch.full((pad,), -1)])
    vs = VerticalSlash(vertical=300, slash=400, local=32, probe=64)
    rot = None
    if c is not None:
        dc = DualChunk(c + 100, 100)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
        rot = (*(x[0] for x in dca_queries(q, qp[None], dc, inv_freq)), dc.chunk_len)
    for _ in range(2):  # the second call reuses the first's buffers
        cols, offs, is_v, is_s = vs._pattern(q[0], k, qp, kp, kp >= 0, 0.125, rot)
        rcols, roffs, ratt = _pattern_full_size(vs, q[0], k, qp, kp, kp >= 0, 0.125, rot)
        assert torch.equal(cols, rcols) and torch.equal(offs, roffs)
        assert torch.equal(vs.scratch["att"][: ratt.numel()].view_as(ratt), ratt)  # the probe's attention, bit for bit
        assert torch.equal(is_v.sum(1), torch.full((Hq,), 300)) and bool(is_s[:, :32].all())
    if c is not None:  # the probe's rows sit where the case says
        qc = (qp[-64:] // c).unique()
        assert len(qc) == (2 if S in (4801, 4830) and T > 1 else 1)
    assert vs.scratch["att"].numel() >= Hq * min(64, T) * (S + pad)
