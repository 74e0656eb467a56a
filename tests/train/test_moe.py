"""Mixture-of-experts MLP and its load-balancing loss (micro-batch vs global batch); the engine
serves an MoE model; resume is step-exact."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.engine.reference import ReferenceDecoder
from slimlm.errors import SlimLMError
from slimlm.model.config import ModelConfig
from slimlm.model.hub import load
from slimlm.model.weights import save_model_dir
from slimlm.train.config import MoESpec
from slimlm.train.distributed import World
from slimlm.train.metrics import read_metrics
from slimlm.train.moe_balance import LoadBalance
from slimlm.train.presets import model_config, new_model
from tests.train.helpers import losses_after_kill_and_resume

MOE = dict(num_experts=4, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=32)


def moe_model(seed: int = 0, vocab: int = 128):
    return new_model(model_config("micro", vocab).replace(**MOE), init_std=0.1, seed=seed)


def test_moe_mlp_equals_a_per_token_sum_over_its_top_k_experts():
    mlp = moe_model().model.layers[0].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = mlp(x)
        for n, t in enumerate(x.reshape(-1, 64)):
            p = torch.softmax(mlp.gate(t), -1)
            w, e = p.topk(2)
            want = sum(w[j] / w.sum() * mlp.experts[int(e[j])](t) for j in range(2)) + mlp.shared_experts(t)
            torch.testing.assert_close(got.reshape(-1, 64)[n], want, atol=1e-6, rtol=1e-5)


def balance_losses(mode: str, micro: list[torch.Tensor]) -> float:
    model = moe_model()
    lb = LoadBalance(model, mode, 1.0, World())
    lb.begin_update(sum(b.numel() for b in micro), len(micro))
    total = 0.0
    for ids in micro:
        model(ids)
        total += float(lb.loss().detach())
    return total


def test_global_balance_equals_micro_batch_balance_only_for_one_micro_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 16), generator=g)
    one = balance_losses("global", [ids]), balance_losses("micro_batch", [ids])
    assert one[0] == pytest.approx(one[1], rel=1e-6)
    model = moe_model()  # and both equal the formula E * sum_i f_i P_i, summed over layers
    model(ids)
    want = 0.0
    for m in (layer.mlp for layer in model.model.layers):
        f = torch.bincount(m.router_choice.flatten(), minlength=4).double() / m.router_choice.numel()
        want += 4 * float((f * m.router_probs.detach().double().mean(0)).sum())
    assert one[0] == pytest.approx(want, rel=1e-6)
    skewed = [torch.full((2, 16), 7), torch.randint(0, 128, (2, 16), generator=g)]  # two unlike micro-batches
    two = balance_losses("global", skewed), balance_losses("micro_batch", skewed)
    assert abs(two[0] - two[1]) > 1e-3 * two[1]


def test_bad_moe_settings_are_one_line_errors():
    with pytest.raises(SlimLMError, match="model.moe.top_k 3 must be between 1 and model.moe.num_experts 2"):
        MoESpec(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts_per_tok 5 must be between 1 and num_experts 4"):
        ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    num_experts=4, num_experts_per_tok=5)
    with pytest.raises(SlimLMError, match="model.moe.balance must be global or micro_batch; got 'rank'"):
        MoESpec(num_experts=2, balance="rank")


def test_the_engine_serves_an_moe_model(tmp_path, tiny_llama_dir):
    tok = load(tiny_llama_dir).tokenizer
    model = moe_model(vocab=tok.vocab_size).eval()
    save_model_dir(model, tmp_path, tok)
    lm = load(tmp_path)  # config.json round trip
    assert lm.model.cfg.num_experts == 4 and lm.model.cfg.num_shared_experts == 1
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), model(ids))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [5, 6, 7, 20, 21, 22, 23]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    dec = ReferenceDecoder(lm.model, [])
    expected = [[e.token_id for e in dec.stream(p, params)] for p in prompts]
    outs = LLM(lm, max_num_batched_tokens=16, block_size=8).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


MOE_ARGS = ("--model.moe.num_experts", "4", "--model.moe.top_k", "2", "--model.moe.intermediate_size", "32")


@pytest.mark.parametrize("balance", ["global", "micro_batch"])
def test_moe_trains_and_resumes_step_exactly(prepared, tmp_path, balance):
    extra = (*MOE_ARGS, "--model.moe.balance", balance, "--train.grad_accum", "2")

    curve = losses_after_kill_and_resume(prepared, tmp_path, *extra)
    assert curve["cut"] == curve["ref"]
    recs = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    assert all(0 < r["moe_load_entropy"] <= 1 and r["moe_aux_loss"] > 0 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
