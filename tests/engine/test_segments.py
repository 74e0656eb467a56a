"""Set-Based Prompting through the engine: order invariance (greedy, exact), a dense reference
with the layout's positions and mask, prefix caching salted by the layout, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.segments import PromptLayout, build_segments, set_allow_mask
from slimlm.model.attention import attention
from slimlm.model.hub import load

PREFIX = {"ids": [5, 17, 29, 41, 53, 65, 77]}
ELEMENTS = [{"ids": [101, 102, 103, 104]}, {"ids": [201, 202]}, {"ids": [301, 302, 303, 304, 305, 306]},
            {"ids": [44]}]
SUFFIX = {"ids": [9, 19, 39]}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(str(tiny_llama_dir))


def _prompt(order):
    return {"segments": [PREFIX, {"set": [ELEMENTS[i] for i in order]}, SUFFIX]}


def _lp(out):
    return [next(iter(d.values())) for d in out.prompt_logprobs[1:]]


def test_layout_positions_and_mask():
    ids, lay = build_segments(["ab", {"set": ["cde", "f"]}, "g"], lambda t: [ord(c) for c in t])
    assert ids == [ord(c) for c in "abcdefg"]
    assert lay.positions == (0, 1, 2, 3, 4, 2, 5)  # both elements start at 2; "g" after the longest
    assert lay.positions_for(6, 3) == [5, 6, 7]  # generated tokens continue from the span
    allow = set_allow_mask(lay, torch.arange(7), torch.arange(7))
    assert not allow[5, 2] and not allow[2, 5] and allow[6, 2] and allow[6, 5] and allow[5, 1]
    assert build_segments(["ab", "c"], lambda t: [ord(c) for c in t])[1] is None  # no set: a plain prompt


@pytest.mark.parametrize("budget", [2048, 5])  # one prefill; chunks of 5 (single set tokens alone too)
def test_every_order_of_the_set_gives_the_same_greedy_output(tiny, budget):
    llm = LLM(tiny, kv_cache_bytes="8M", max_num_batched_tokens=budget)
    sp = SamplingParams(temperature=0, max_tokens=12)
    orders = list(itertools.permutations(range(4)))
    outs = llm.generate([_prompt(o) for o in orders], sp, use_tqdm=False)
    first = outs[0].outputs[0].token_ids
    assert len(first) == 12
    assert all(o.outputs[0].token_ids == first for o in outs)
    # while the ordered prompts (plain concatenation) do depend on the order
    plain = llm.generate([[t for s in _prompt(o)["segments"] for t in (s["ids"] if "ids" in s else
                           [x for e in s["set"] for x in e["ids"]])] for o in orders], sp, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in plain}) > 1


class LayoutAttention:
    """Dense reference: causal in token order, minus cross-element pairs."""

    def __init__(self, layout: PromptLayout, scale: float):
        n = len(layout.positions)
        idx = torch.arange(n)
        self.mask = ((idx[None, :] <= idx[:, None]) & set_allow_mask(layout, idx, idx))[None, None]
        self.scale = scale

    def attend(self, layer, q, k, v, q_rows=None):
        return attention(q, k, v, self.mask, self.scale)


def test_engine_matches_a_dense_reference_with_the_layout(tiny):
    model = tiny.model
    prompt = _prompt([2, 0, 3, 1])
    ids, lay = build_segments(prompt["segments"], None)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([lay.positions]),
                       LayoutAttention(lay, model.attn_scale))[0].log_softmax(-1)
    ref = logits[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    for budget in (2048, 6):
        out = LLM(tiny, kv_cache_bytes="8M", max_num_batched_tokens=budget).generate(
            [prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        assert torch.allclose(torch.tensor(_lp(out)), ref, atol=1e-4)
        assert out.outputs[0].token_ids == [int(logits[-1].argmax())]


def test_prefix_cache_is_salted_by_the_layout(tiny):
    llm = LLM(tiny, kv_cache_bytes="8M", block_size=4)
    sp = SamplingParams(temperature=0, max_tokens=4)
    a = llm.generate([_prompt([0, 1, 2, 3])], sp, use_tqdm=False)[0]
    b = llm.generate([_prompt([0, 1, 2, 3])], sp, use_tqdm=False)[0]
    assert b.num_cached_tokens > 0 and a.outputs[0].token_ids == b.outputs[0].token_ids
    flat = a.prompt_token_ids
    c = llm.generate([flat], sp, use_tqdm=False)[0]  # same tokens, ordinary positions: no reuse
    assert c.num_cached_tokens == 0


@pytest.mark.parametrize("segments, msg", [
    ([PREFIX, {"set": [ELEMENTS[0]]}], "a set needs at least 2 elements"),
    ([{"set": [ELEMENTS[0], {"set": [ELEMENTS[1], ELEMENTS[2]]}]}], "sets cannot be nested"),
    ([], "non-empty list"),
    ([PREFIX, {"ids": []}], "segment 1 is empty"),
    ([PREFIX, 3], "a segment is a string"),
    ([{"ids": [5] * 300}], "context"),
])
def test_bad_segments_are_one_line_errors(tiny, segments, msg):
    llm = LLM(tiny, kv_cache_bytes="8M")
    with pytest.raises(ValueError, match=msg) as e:
        llm.generate([{"segments": segments}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert "\n" not in str(e.value)


def test_segments_refused_where_the_engine_cannot_follow(tiny):
    llm = LLM(tiny, kv_cache_bytes="8M", rope_extension="dca", rope_extension_args={"chunk_size": 64})
    with pytest.raises(ValueError, match="dca"):
        llm.generate([_prompt([0, 1, 2, 3])], SamplingParams(max_tokens=2), use_tqdm=False)


def test_stream_takes_segments(tiny):
    llm = LLM(tiny, kv_cache_bytes="8M")
    sp = SamplingParams(temperature=0, max_tokens=6)
    ids = [t for o in llm.stream(_prompt([3, 1, 0, 2]), sp) for t in o.outputs[0].token_ids]
    assert ids == llm.generate([_prompt([0, 1, 2, 3])], sp, use_tqdm=False)[0].outputs[0].token_ids


def test_segments_past_the_extended_context_are_one_line(tiny):
    llm = LLM(tiny, kv_cache_bytes="8M", rope_extension="yarn", rope_extension_args={"context": 512})
    sp = SamplingParams(temperature=0, max_tokens=2)
    ok = {"segments": [{"ids": [5] * 300}, {"set": [{"ids": [6] * 20}, {"ids": [7] * 30}]}]}
    assert len(llm.generate([ok], sp, use_tqdm=False)[0].outputs[0].token_ids) == 2  # past the trained 256
    with pytest.raises(ValueError, match="context") as e:
        llm.generate([{"segments": [{"ids": [5] * 480}, {"set": [{"ids": [6] * 20}, {"ids": [7] * 40}]}]}], sp,
                     use_tqdm=False)
    assert "\n" not in str(e.value)
