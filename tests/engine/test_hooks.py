"""Per-layer runner hooks attach without editing the model."""

from __future__ import annotations

import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.hooks import LAYER_HOOKS, LayerHook
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts


def test_hooks_see_every_layer_and_ffn_skip_only_touches_decode(tiny_llama_dir):
    lm = load(tiny_llama_dir)
    prompts = make_prompts(4, seed=1)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in LLM(lm).generate(prompts, p, use_tqdm=False)]
    none = LLM(lm, hooks=["ffn_skip"], hook_args={"ffn_skip": {"layers": []}})
    assert [o.outputs[0].token_ids for o in none.generate(prompts, p, use_tqdm=False)] == base
    skip = LLM(lm, hooks=["ffn_skip"], hook_args={"ffn_skip": {"layers": [0, 1]}})
    got = [o.outputs[0].token_ids for o in skip.generate(prompts, p, use_tqdm=False)]
    assert [g[0] for g in got] == [b[0] for b in base]  # first token comes from prefill: untouched
    assert got != base  # decode tokens lost their MLPs


def test_custom_hook_observes_layers(tiny_llama_dir):
    seen: list[int] = []

    class Spy(LayerHook):
        def before_layer(self, layer: int, h: torch.Tensor, info) -> torch.Tensor:
            seen.append(layer)
            return h

    llm = LLM(load(tiny_llama_dir))
    llm.engine.runner.hooks.append(Spy())
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert seen == [0, 1] * 3
    assert "ffn_skip" in LAYER_HOOKS.names()
