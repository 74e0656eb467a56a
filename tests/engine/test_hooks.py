"""Per-layer plans: hooks attach without editing the model; every registered hook runs inside
batching with the pool returned; ffn_skip depends on positions, not on chunk boundaries.
LazyLLM's reference tests are in test_lazyllm.py."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.hooks import LAYER_HOOKS, LayerHook, Segment, StepInfo, combine_plans
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


def greedy(llm, prompts, n=10):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]


def test_ffn_skip_touches_only_generated_tokens(tiny):
    prompts = make_prompts(4, seed=1)
    base = greedy(LLM(tiny), prompts)
    assert greedy(LLM(tiny, hooks=["ffn_skip"], hook_args={"ffn_skip": {"layers": []}}), prompts) == base
    got = greedy(LLM(tiny, hooks=["ffn_skip"], hook_args={"ffn_skip": {"layers": [0, 1]}}), prompts)
    assert [g[0] for g in got] == [b[0] for b in base]  # first token comes from the prompt: untouched
    assert got != base  # generated tokens lost their MLPs


@pytest.mark.parametrize("settings", [dict(max_num_batched_tokens=16, block_size=8),
                                      dict(max_num_batched_tokens=512, block_size=16),
                                      dict(max_num_batched_tokens=64, enable_prefix_caching=False)])
def test_ffn_skip_does_not_depend_on_chunking(tiny, settings):
    """A generated token skips its MLP whether it comes as a decode or inside a recomputed
    chunk: outputs agree across chunk sizes, prefix caching and forced preemption."""
    prompts = make_prompts(16, seed=2)
    args = {"ffn_skip": {"layers": [1]}}
    want = greedy(LLM(tiny, hooks=["ffn_skip"], hook_args=args, max_num_batched_tokens=64), prompts, 12)
    assert greedy(LLM(tiny, hooks=["ffn_skip"], hook_args=args, **settings), prompts, 12) == want
    c = tiny.model.cfg
    tight = 2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4 * 24  # 24 blocks of 8: preemption
    llm = LLM(tiny, hooks=["ffn_skip"], hook_args=args, block_size=8, kv_cache_bytes=tight,
              max_num_batched_tokens=64)
    assert greedy(llm, prompts, 12) == want
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("name", LAYER_HOOKS.names())
def test_every_hook_runs_in_the_engine(tiny, name):
    prompts = [(p * 2)[:200] for p in make_prompts(6, seed=3)]
    llm = LLM(tiny, hooks=[name], max_num_batched_tokens=64, block_size=8)
    assert all(len(g) == 6 for g in greedy(llm, prompts, 6))
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_custom_hook_observes_layers_and_rows(tiny):
    seen: list[tuple[int, int]] = []

    class Spy(LayerHook):
        def plan(self, layer, h, info: StepInfo, active):
            seen.append((layer, int(info.row_seq.numel())))
            assert info.row_output.dtype == torch.bool and info.logit_rows.numel() >= 1
            return None

    llm = LLM(tiny)
    llm.engine.runner.hooks.append(Spy())
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert seen == [(0, 3), (1, 3), (0, 1), (1, 1), (0, 1), (1, 1)]


def test_combined_plans_keep_logit_rows():
    from slimlm.model.transformer import RowPlan

    plan = combine_plans([RowPlan(q_rows=torch.tensor([0, 2]))], None, torch.tensor([3]), 5)
    assert plan.q_rows.tolist() == [0, 2, 3]
    later = combine_plans([], plan.q_rows, torch.tensor([3]), 5)  # rows that left stay out
    assert later.q_rows.tolist() == [0, 2, 3]
    assert combine_plans([], None, torch.tensor([3]), 5) is None


class DenseWithHook:
    """Dense, unbatched forward running the hook's plans: the prompt is one prefill segment,
    generated tokens are not pruned (as in the engine's decode steps)."""

    def __init__(self, lm, hook):
        self.lm, self.hook = lm, hook
        hook.bind(lm.model)

    @torch.no_grad()
    def greedy(self, prompt, n):
        m = self.lm.model
        ids = list(prompt)
        for _ in range(n):
            T = len(ids)
            pos = torch.arange(T)[None]
            attn = m.dense_attention(pos)
            info = StepInfo(pos[0], 0, torch.zeros(T, dtype=torch.long), torch.arange(T) >= len(prompt),
                            torch.tensor([T - 1]), (Segment(0, 0, len(prompt), True),))
            h = m.embed(torch.tensor([ids]))
            cos, sin = m.rotary(pos, h.dtype)
            active = None
            for i, layer in enumerate(m.model.layers):
                p = self.hook.plan(i, h, info, active)
                plan = combine_plans([p] if p is not None else [], active, info.logit_rows, T)
                active = plan.q_rows if plan is not None else None
                h = layer(h, cos, sin, attn, plan)
            ids.append(int(m.head(h[:, -1:])[0, -1].argmax()))
        return ids[len(prompt):]


@pytest.mark.parametrize("args,msg", [({"layers": [0.5], "keep": [0.5, 0.2]}, "one keep ratio"),
                                      ({"layers": [0.3, 0.6], "keep": [0.2, 0.5]}, "non-increasing"),
                                      ({"layers": [9], "keep": [0.5]}, "outside the model"),
                                      ({"heads": "median"}, "'mean' or 'max'"), ({"pool": 4}, "pool must be odd"),
                                      ({"window": 0}, "window must be an integer")])
def test_lazyllm_bad_arguments(tiny, args, msg):
    with pytest.raises((ValueError, SlimLMError), match=msg):
        LLM(tiny, hooks=["lazyllm"], hook_args={"lazyllm": args})
