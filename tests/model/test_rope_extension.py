"""RoPE extensions: DCA reduces to standard attention below its chunk, matches a dense
definition past it, lifts the context check; bad settings are one-line errors."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.errors import SlimLMError
from slimlm.model.attention import attention
from slimlm.model.hub import load
from slimlm.model.rope import apply_rope

DCA = {"chunk_size": 64, "local_window": 8}  # chunk_len c = 56; the tiny model is trained to 256


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(str(tiny_llama_dir))


def _lp(out) -> list[float]:
    return [next(iter(d.values())) for d in out.prompt_logprobs[1:]]


def test_dca_below_the_chunk_is_standard_attention(tiny):
    prompts = [[(7 * i + j) % 300 + 3 for i in range(n)] for j, n in enumerate((12, 40, 55))]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    plain = LLM(tiny, kv_cache_bytes="8M").generate(prompts, sp, use_tqdm=False)
    dca = LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args=DCA).generate(
        prompts, sp, use_tqdm=False)
    for a, b in zip(plain, dca):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert torch.allclose(torch.tensor(_lp(a)), torch.tensor(_lp(b)), atol=1e-5)
    # greedy continuations up to the chunk length are the same tokens
    g = SamplingParams(temperature=0, max_tokens=20)
    p = [prompts[0]]
    assert (LLM(tiny, kv_cache_bytes="8M").generate(p, g, use_tqdm=False)[0].outputs[0].token_ids
            == LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args=DCA)
            .generate(p, g, use_tqdm=False)[0].outputs[0].token_ids)


class DenseDCA:
    """The definition, pair by pair: un-rotate q and k, then score each (i, j) at the relative
    distance DCA assigns it (intra: i - j; previous chunk: min(i%c + c, s) - j%c; older:
    s - j%c), the logits times ``scale`` and, for pairs in different chunks, times ``cross``."""

    def __init__(self, pos: torch.Tensor, rotary, s: int, w: int, scale: float, cross: float = 1.0,
                 rows: torch.Tensor | None = None):
        self.pos, self.rotary, self.s, self.c, self.scale, self.cross = pos, rotary, s, s - w, scale, cross
        self.rows = rows  # (T,) a factor per query row, or None

    def attend(self, layer, q, k, v, q_rows=None):
        c, s = self.c, self.s
        p = self.pos  # (1, T)
        back = self.rotary(-(p % c), q.dtype)
        q0, k0 = apply_rope(q, *back), apply_rope(k, *back)  # unrotated
        i, j = p[0][:, None], p[0][None, :]
        qi = torch.where(i // c == j // c, i % c, torch.where(i // c - j // c == 1, (i % c + c).clamp(max=s),
                                                              torch.full_like(i, s)))
        dist = qi - j % c  # (T, T)
        G = q.shape[1] // k.shape[1]
        k0 = k0.repeat_interleave(G, 1)
        scores = torch.zeros(q.shape[1], p.shape[1], p.shape[1])
        for d in dist.unique().tolist():
            cos, sin = self.rotary(torch.full_like(p, d), q.dtype)
            sc = apply_rope(q0, cos, sin)[0] @ k0[0].transpose(-1, -2)  # (H, T, T)
            scores = torch.where(dist == d, sc, scores)
        scores = torch.where(i // c == j // c, scores, scores * self.cross)
        if self.rows is not None:
            scores = scores * self.rows[:, None]
        scores = (scores * self.scale).masked_fill(~(j <= i), float("-inf"))
        return (scores.softmax(-1) @ v.repeat_interleave(G, 1)[0])[None]


@pytest.mark.parametrize("temp", [{}, {"logit_scale": 1.1, "cross_scale": 1.3}, {"cross_scale": 0.8}])
def test_dca_past_the_chunk_matches_a_dense_definition(tiny, temp):
    model = tiny.model
    T = 150  # chunks of 56: intra, successive and inter pairs
    ids = [(11 * i) % 350 + 3 for i in range(T)]
    pos = torch.arange(T)[None]
    ref_attn = DenseDCA(pos, model.rotary, 64, 8, model.attn_scale * temp.get("logit_scale", 1.0),
                        temp.get("cross_scale", 1.0))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), pos % 56, ref_attn)[0].log_softmax(-1)  # (T, V)
    ref = logits[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    for chunk in (2048, 37):  # one prefill, and chunked prefill (context from the paged cache)
        llm = LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args={**DCA, **temp},
                  max_num_batched_tokens=chunk, native_kernels=True)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        assert torch.allclose(torch.tensor(_lp(out)), ref, atol=2e-4), chunk
    # a decode step: the next token's distribution also follows the definition
    nxt = int(logits[-1].argmax())
    assert out.outputs[0].token_ids == [nxt]


@pytest.mark.parametrize("mode, power", [("auto", 1), ("yarn", 2)])
def test_dca_auto_logit_scale_matches_a_dense_definition(tiny, mode, power):
    """``logit_scale="auto"``: a query at i scales its logits by max(1, 0.1 ln((i + 1) / trained) + 1)
    (``"yarn"``: squared; trained 256 here: rows past it), on every path; inside the trained context
    nothing changes."""
    model = tiny.model
    T = 330
    ids = [(11 * i) % 350 + 3 for i in range(T)]
    pos = torch.arange(T)[None]
    f = ((0.1 * torch.log((pos[0] + 1).double() / 256) + 1).clamp(min=1) ** power).float()
    ref_attn = DenseDCA(pos, model.rotary, 64, 8, model.attn_scale, rows=f)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), pos % 56, ref_attn)[0].log_softmax(-1)
    ref = logits[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    args = {**DCA, "logit_scale": mode, "context": 512}
    for chunk in (2048, 37):
        llm = LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args=args,
                  max_num_batched_tokens=chunk)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        assert torch.allclose(torch.tensor(_lp(out)), ref, atol=2e-4), chunk
    assert out.outputs[0].token_ids == [int(logits[-1].argmax())]
    # inside the trained context "auto" / "yarn" is no temperature (logit_scale 1) exactly
    short = ids[:200]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    a = LLM(tiny, kv_cache_bytes="8M", rope_extension="dca",
            rope_extension_args={**DCA, "logit_scale": 1}).generate([short], sp, use_tqdm=False)[0]
    b = LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args=args).generate([short], sp,
                                                                                              use_tqdm=False)[0]
    assert _lp(a) == _lp(b)


def test_dca_dense_attention_helper_agrees_with_sdpa_below_the_chunk():
    from slimlm.model.rope_extension import DualChunk, dca_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    pos = torch.arange(20)[None]
    mask = (pos[0][None, :] <= pos[0][:, None])[None, None]
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    out = dca_attention(q, k, v, mask, pos, pos, DualChunk(32, 4), inv, 0.25)
    assert torch.allclose(out, attention(q, k, v, mask, 0.25), atol=1e-5)
    hot = dca_attention(q, k, v, mask, pos, pos, DualChunk(32, 4, logit_scale=1.5), inv, 0.25)  # YaRN temperature
    assert torch.allclose(hot, attention(q, k, v, mask, 0.25 * 1.5), atol=1e-5)
    cross = dca_attention(q, k, v, mask, pos, pos, DualChunk(32, 4, cross_scale=1.5), inv, 0.25)  # no cross pair
    assert torch.equal(cross, out)


def test_dca_defaults_are_chunkllamas(tiny):
    """ChunkLlama's reference defaults: chunk 3/4 of the trained context, local window 1/16 of it
    (SmolLM2, trained to 8,192: 6,144 and 512); the window is held below half a small chunk."""
    from dataclasses import replace

    from slimlm.model.rope_extension import DualChunk, DualChunkExtension

    cfg = tiny.model.cfg  # trained to 256
    yarn = {"length_base": 256, "length_power": 2}  # the default temperature, logit_scale="yarn"
    assert DualChunkExtension(cfg).dual_chunk == DualChunk(192, 16, **yarn)
    assert DualChunkExtension(replace(cfg, max_position_embeddings=8192)).dual_chunk == DualChunk(
        6144, 512, length_base=8192, length_power=2)
    assert DualChunkExtension(cfg, chunk_size=20).dual_chunk == DualChunk(20, 10, **yarn)
    assert DualChunkExtension(cfg, logit_scale=1).dual_chunk == DualChunk(192, 16)  # the old default, selectable


def test_extensions_lift_the_context_check(tiny):
    ids = [5] * 300  # past the trained 256
    sp = SamplingParams(temperature=0, max_tokens=3)
    with pytest.raises(ValueError, match="context"):
        LLM(tiny, kv_cache_bytes="8M").generate([ids], sp, use_tqdm=False)
    for name in ("dca", "yarn", "dynamic", "extrapolate"):
        args = dict(DCA) if name == "dca" else {}
        llm = LLM(tiny, kv_cache_bytes="8M", rope_extension=name, rope_extension_args={**args, "context": 512})
        assert llm.context_length == 512
        assert len(llm.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids) == 3
        with pytest.raises(ValueError, match="context"):
            llm.generate([[5] * 600], sp, use_tqdm=False)


@pytest.mark.parametrize("args, msg", [
    ({"chunk_size": 256}, "below the trained context"),
    ({"chunk_size": 300}, "below the trained context"),
    ({"chunk_size": 64, "local_window": 64}, "local_window < chunk_size"),
    ({"chunk": 3}, "unexpected keyword"),
    ({"logit_scale": 0}, "logit_scale must be"),
    ({"cross_scale": 5}, "cross_scale must be"),
    ({"logit_scale": "hot"}, "logit_scale must be a number"),
])
def test_bad_dca_settings(tiny, args, msg):
    with pytest.raises(SlimLMError, match=msg):
        LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args=args)


def test_bad_extension_name_and_combinations(tiny):
    with pytest.raises(SlimLMError, match="known: dca, dynamic, extrapolate, yarn"):
        LLM(tiny, kv_cache_bytes="8M", rope_extension="ntk")
    with pytest.raises(SlimLMError, match="KV policy"):
        LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", kv_policy="sink")
    with pytest.raises(SlimLMError, match="layer hooks"):
        LLM(tiny, kv_cache_bytes="8M", rope_extension="yarn", hooks=["lazyllm"])


def test_dca_batched_decodes_equal_one_at_a_time(tiny):
    prompts = [[(13 * i + j) % 350 + 3 for i in range(n)] for j, n in enumerate((70, 130, 20))]
    sp = SamplingParams(temperature=0, max_tokens=12)
    llm = LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args=DCA, native_kernels=False)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_dca_key_ranges_with_block_padding():
    """Keys gathered in blocks end with padding (-1); a query chunk that starts near the end must
    still find its own keys (the ranges are looked up with padding sorted last)."""
    from slimlm.model.rope_extension import DualChunk, dca_attention

    torch.manual_seed(0)
    L, pad, c = 60, 13, 28  # DualChunk(32, 4): c = 28; the last 4 tokens are chunk 2
    q, k, v = torch.randn(1, 4, 4, 16), torch.randn(1, 2, L + pad, 16), torch.randn(1, 2, L + pad, 16)
    kp = torch.cat([torch.arange(L), torch.full((pad,), -1)])[None]
    qp = torch.arange(L - 4, L)[None]
    mask = ((kp[0][None, :] <= qp[0][:, None]) & (kp[0][None, :] >= 0))[None, None]
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    out = dca_attention(q, k, v, mask, qp, kp, DualChunk(32, 4), inv, 0.25)
    ref = dca_attention(q, k[:, :, :L], v[:, :, :L], mask[..., :L], qp, kp[:, :L], DualChunk(32, 4), inv, 0.25)
    assert torch.allclose(out, ref, atol=1e-6)
