"""Adaptive FFN skipping (FFN-SkipLLM) and SkipDecode inside batching: position-based (not
chunk-based) decisions, equal to a dense per-token reference, bad arguments refused."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.hooks import StepInfo
from slimlm.engine.hooks.skipdecode import SkipDecode
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from slimlm.model.transformer import RowPlan
from tests.conftest import make_hf_model
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep")
    make_hf_model(path, "llama", seed=2, num_hidden_layers=8)
    return load(path)


def greedy(llm, prompts, n=12):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]


def tight(lm, blocks=40):
    c = lm.model.cfg
    return 2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4 * blocks


SETTINGS = [dict(max_num_batched_tokens=512), dict(max_num_batched_tokens=16, block_size=8),
            dict(max_num_batched_tokens=64, native_kernels=False)]

ADAPTIVE = {"adaptive": True, "threshold": 0.5, "probe": 3, "keep_first": 2, "keep_last": 2, "max_skip": 1.0}


def test_adaptive_ffn_skip_probes_then_skips_saturated_layers(deep):
    prompts = make_prompts(6, seed=1)
    base = greedy(LLM(deep), prompts)
    llm = LLM(deep, hooks=["ffn_skip"], hook_args={"ffn_skip": ADAPTIVE})
    got = greedy(llm, prompts)
    hook = llm.engine.hooks[0]
    # the probe tokens ran every FFN (the hook ran the measured ones itself): outputs agree up to
    # the first token computed after the decision
    assert [g[:4] for g in got] == [b[:4] for b in base]
    assert hook.counts["mlp_skipped"] > 0 and got != base
    nothing = LLM(deep, hooks=["ffn_skip"], hook_args={"ffn_skip": {**ADAPTIVE, "threshold": 1.0}})
    assert greedy(nothing, prompts) == base  # no FFN is that saturated: nothing skipped, exact
    assert nothing.engine.hooks[0].counts["mlp_skipped"] == 0


@pytest.mark.parametrize("settings", SETTINGS)
def test_adaptive_ffn_skip_does_not_depend_on_chunking_or_preemption(deep, settings):
    prompts = make_prompts(10, seed=2)
    args = {"ffn_skip": ADAPTIVE}
    want = greedy(LLM(deep, hooks=["ffn_skip"], hook_args=args, max_num_batched_tokens=64), prompts)
    assert greedy(LLM(deep, hooks=["ffn_skip"], hook_args=args, **settings), prompts) == want
    llm = LLM(deep, hooks=["ffn_skip"], hook_args=args, block_size=8, kv_cache_bytes=tight(deep),
              max_num_batched_tokens=64)
    assert greedy(llm, prompts) == want
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


@pytest.mark.parametrize("args, msg", [({"adaptive": True, "threshold": 0.0}, "threshold"),
                                       ({"adaptive": True, "threshold": 1.5}, "threshold"),
                                       ({"adaptive": True, "max_skip": 2}, "max_skip"),
                                       ({"adaptive": True, "keep_first": 4, "keep_last": 4}, "nothing is left"),
                                       ({"layers": [99]}, "outside the model"),
                                       ({"adaptive": True, "layers": [1]}, "either")])
def test_ffn_skip_bad_arguments(deep, args, msg):
    with pytest.raises((ValueError, SlimLMError), match=msg):
        LLM(deep, hooks=["ffn_skip"], hook_args={"ffn_skip": args})


# ------------------------------------------------------------------ SkipDecode
def skipdecode_reference(lm, hook, prompt, n):
    """Dense recompute of the whole sequence for every token: generated token g runs only the
    layers from hook.skipped(g) up (its state is carried through the skipped ones)."""
    m = lm.model
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            T = len(ids)
            pos = torch.arange(T)[None]
            attn = m.dense_attention(pos)
            skip = torch.tensor([0] * len(prompt) + [hook.skipped(g) for g in range(T - len(prompt))])
            h = m.embed(torch.tensor([ids]))
            cos, sin = m.rotary(pos, h.dtype)
            for i, layer in enumerate(m.model.layers):
                run = (skip <= i).nonzero()[:, 0]
                h = layer(h, cos, sin, attn, RowPlan(run, run))
            ids.append(int(m.head(h[:, -1:])[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("settings", SETTINGS)
def test_skipdecode_equals_a_dense_reference(deep, settings):
    prompts = make_prompts(6, seed=3)
    args = {"min_layers": 3, "ramp": 6}
    llm = LLM(deep, hooks=["skipdecode"], hook_args={"skipdecode": args}, **settings)
    got = greedy(llm, prompts)
    hook = SkipDecode(**args)
    hook.bind(deep.model)
    assert [hook.skipped(g) for g in range(8)] == [0, 1, 2, 2, 3, 4, 5, 5]  # non-decreasing, floor 3 layers
    want = [skipdecode_reference(deep, hook, p, 12) for p in prompts]
    assert got == want
    base = greedy(LLM(deep), prompts)
    assert [g[:2] for g in got] == [b[:2] for b in base] and got != base
    st = llm.engine.hooks[0].counts
    assert st["layers_skipped"] > 0
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


def test_skipdecode_under_preemption_and_without_skipping(deep):
    prompts = make_prompts(10, seed=4)
    args = {"skipdecode": {"min_layers": 4, "ramp": 4}}
    want = greedy(LLM(deep, hooks=["skipdecode"], hook_args=args), prompts)
    llm = LLM(deep, hooks=["skipdecode"], hook_args=args, block_size=8, kv_cache_bytes=tight(deep),
              max_num_batched_tokens=64)
    assert greedy(llm, prompts) == want and llm.engine.scheduler.num_preemptions > 0
    full = LLM(deep, hooks=["skipdecode"], hook_args={"skipdecode": {"min_layers": 8}})
    assert greedy(full, prompts) == greedy(LLM(deep), prompts)


@pytest.mark.parametrize("args, msg", [({"min_layers": 0}, "outside the model"), ({"min_layers": 9}, "outside the model"),
                                       ({"ramp": 0}, "ramp")])
def test_skipdecode_bad_arguments(deep, args, msg):
    with pytest.raises((ValueError, SlimLMError), match=msg):
        LLM(deep, hooks=["skipdecode"], hook_args={"skipdecode": args})


def test_bypassed_rows_rejoin_only_for_that_layer():
    from slimlm.engine.hooks import LayerHook, bypass_plan

    class B(LayerHook):
        def bypass(self, layer, info):
            return torch.tensor([0, 2]) if layer == 0 else None

    info = StepInfo(torch.arange(4), 0)
    runs, plan = bypass_plan([B()], 0, info, None, 4)
    assert runs and plan.q_rows.tolist() == [1, 3] and plan.mlp_rows.tolist() == [1, 3]
    assert bypass_plan([B()], 1, info, None, 4) == (True, None)


# ------------------------------------------------------------------ SkipDecode fine-tuning
def test_skipdecode_training_forward_is_the_served_computation(deep):
    """The trainer's dense forward with per-position bypass predicts exactly the tokens the
    engine generates with the hook (same schedule, prompt of P tokens)."""
    from slimlm.compress.skipdecode_train import layer_skips, skip_forward

    args = {"min_layers": 3, "ramp": 6}
    prompts = make_prompts(3, seed=7)
    got = greedy(LLM(deep, hooks=["skipdecode"], hook_args={"skipdecode": args}), prompts, n=10)
    hook = SkipDecode(**args)
    hook.bind(deep.model)
    for p, g in zip(prompts, got):
        ids = torch.tensor([p + g])
        with torch.no_grad():
            logits = skip_forward(deep.model, ids, layer_skips(hook, ids.shape[1], len(p)))
        assert logits[0, len(p) - 1 : -1].argmax(-1).tolist() == g


def test_skipdecode_fine_tuning_lowers_the_skipping_perplexity(deep, tmp_path, capsys):
    """A few steps of `slimlm skipdecode-tune` on repetitive text: the held-out perplexity of
    the generated part under the schedule drops; the written folder loads and serves with the
    hook. Bad arguments are one-line errors."""
    import json

    from slimlm.cli import main
    from slimlm.model.weights import save_model_dir

    src = tmp_path / "deep"
    save_model_dir(deep.model, src, deep.tokenizer, deep.generation_config)
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    out = tmp_path / "tuned"
    assert main(["skipdecode-tune", str(out), "--model", str(src), "--data", str(text), "--tokens", "768",
                 "--seq-len", "48", "--prompt-len", "16", "--min-layers", "4", "--ramp", "8", "--steps", "12",
                 "--batch-size", "2", "--lr", "3e-3"]) == 0
    assert "perplexity" in capsys.readouterr().err
    rep = json.loads((out / "skipdecode_train.json").read_text())
    assert rep["heldout_ppl_after"]["skip"] < rep["heldout_ppl_before"]["skip"]
    tuned = load(out)
    assert len(greedy(LLM(tuned, hooks=["skipdecode"], hook_args={"skipdecode": {"min_layers": 4, "ramp": 8}}),
                      make_prompts(2, seed=1))[0]) == 12
    for bad, msg in ((["--min-layers", "9"], "outside the model"), (["--prompt-len", "47"], "--prompt-len")):
        assert main(["skipdecode-tune", str(tmp_path / "x"), "--model", str(src), "--data", str(text),
                     "--tokens", "768", "--seq-len", "48", *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
