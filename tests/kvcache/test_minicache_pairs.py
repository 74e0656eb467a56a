"""MiniCache's explicit pairs and the calibration that ranks them (issue 16 follow-up): the
pairs a calibration pass picks are the ones whose merging costs the attention least, the policy
takes them as an argument, and full retention is the full cache for a lossless codec too."""

from __future__ import annotations

import copy

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.errors import SlimLMError
from slimlm.kvcache.policy.minicache import calibrate_pairs, pair_errors, parse_pairs
from slimlm.model.hub import load
from tests.conftest import make_hf_model
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-4p")
    make_hf_model(path, "llama", seed=3, num_hidden_layers=4)
    return load(path)


@pytest.fixture(scope="module")
def twin(tiny4):
    """tiny4 with layer 1 made a no-op on the residual stream (its o_proj and down_proj zero) and
    layer 2 a copy of layer 1: layers 1 and 2 see the same input, so their keys and values are
    equal and merging them costs nothing."""
    m = copy.deepcopy(tiny4.model)
    layers = m.model.layers
    layers[2].load_state_dict(layers[1].state_dict())
    with torch.no_grad():
        layers[1].self_attn.o_proj.weight.zero_()
        layers[1].mlp.down_proj.weight.zero_()
    return m


def test_pair_errors_find_the_identical_layers(twin):
    ids = list(range(5, 45))
    cost = pair_errors(twin, ids, max_gap=2, queries=16)
    assert set(cost) == {(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)}
    assert cost[(1, 2)] < 1e-5  # equal states: SLERP gives each layer back its own rows
    assert min(v for p, v in cost.items() if p != (1, 2)) > 1e-2  # random layers are not alike
    chosen = calibrate_pairs(twin, None, 2, max_gap=2, ids=ids)
    assert chosen[0][:2] == (1, 2)
    assert len(chosen) == 1 or not {chosen[1][0], chosen[1][1]} & {1, 2}  # disjoint pairs
    assert [c[2] for c in chosen] == sorted(c[2] for c in chosen)


def test_explicit_pairs_shape_the_spec(tiny4):
    eng = LLM(tiny4, block_size=8, kv_cache_bytes="1M", kv_policy="minicache",
              kv_policy_args={"pairs": "0-2"}).engine
    assert [s.storage for s in eng.spec.layers] == [0, 1, 0, 2]
    assert [s.member for s in eng.spec.layers] == [0, 0, 1, 0]
    eng = LLM(tiny4, block_size=8, kv_cache_bytes="1M", kv_policy="minicache",
              kv_policy_args={"pairs": [[2, 3], [0, 1]]}).engine
    assert [s.storage for s in eng.spec.layers] == [0, 0, 1, 1]


def test_explicit_adjacent_pair_equals_start(tiny4):
    prompts = make_prompts(4, seed=7)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    args = {"threshold": 0.42, "retain": 0.25}
    a = LLM(tiny4, block_size=8, kv_policy="minicache", kv_policy_args={"start": 1, "end": 3, **args})
    b = LLM(tiny4, block_size=8, kv_policy="minicache", kv_policy_args={"pairs": "1-2", **args})
    assert a.engine.spec == b.engine.spec
    assert [o.outputs[0].token_ids for o in a.generate(prompts, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in b.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("codec", ["auto", "int8"])
def test_full_retention_is_the_full_cache_for_any_pair(tiny4, codec):
    """Every token retained: the merged storage gives each layer its own rows back, so greedy
    output equals the full cache of the same codec (int8: no key offsets, rows quantized alike)."""
    prompts = make_prompts(6, seed=5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = LLM(tiny4, block_size=8, kv_cache_dtype=codec).generate(prompts, params, use_tqdm=False)
    keep_all = {"pairs": "0-3,1-2", "threshold": 0.0, "retain": 1.0}
    got = LLM(tiny4, block_size=8, kv_cache_dtype=codec, kv_policy="minicache", kv_policy_args=keep_all,
              max_num_batched_tokens=24).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in base]


@pytest.mark.parametrize("pairs,msg", [("1-1", "a < b"), ("2-1", "a < b"), ("0-1,1-2", "one pair at most"),
                                       ("x", "pairs must"), ([[0]], "pairs must"), ("", "a < b")])
def test_bad_pairs_are_one_line_errors(pairs, msg):
    with pytest.raises(ValueError, match=msg):
        parse_pairs(pairs)


def test_pairs_beyond_the_depth_and_with_start_are_refused(tiny4):
    with pytest.raises((ValueError, SlimLMError), match="beyond the model"):
        LLM(tiny4, kv_policy="minicache", kv_policy_args={"pairs": "2-4"})
    with pytest.raises((ValueError, SlimLMError), match="not both"):
        LLM(tiny4, kv_policy="minicache", kv_policy_args={"pairs": "1-2", "start": 1})
