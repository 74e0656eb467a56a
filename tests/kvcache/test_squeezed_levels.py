"""Squeezed Attention's hierarchical lookup (levels=2): coarse centroids pick the fine clusters a
query head may take. The engine equals the dense decoder of the same method; with every coarse
cluster kept it equals one level; it scores fewer centroid bytes than one level."""

from __future__ import annotations

import pytest

from slimlm import LLM, SamplingParams
from slimlm.kvcache.policy import KV_POLICIES
from slimlm.model.hub import load
from tests.kvcache.test_query_policies import ARGS, dense_greedy, shared_prompts

TWO = {**ARGS["squeezed"], "clusters": 24, "levels": 2, "coarse": 0.25, "coarse_budget": 0.3}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


def generate(tiny, args, prompts):
    llm = LLM(tiny, kv_policy="squeezed", kv_policy_args=args, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.engine.policy.stats


def test_two_levels_equal_the_dense_method_and_read_fewer_centroids(tiny):
    prompts = shared_prompts()[:2]
    out, st = generate(tiny, TWO, prompts)
    for p, o in zip(prompts, out):
        assert o == dense_greedy(tiny, KV_POLICIES.get("squeezed")(**TWO), p, 6)
    assert 0 < st["centroid_bytes"] < st["centroid_bytes_flat"]


def test_two_levels_keeping_every_coarse_cluster_is_one_level(tiny):
    prompts = shared_prompts()[:1]
    one, st1 = generate(tiny, {**TWO, "levels": 1}, prompts)
    two, _ = generate(tiny, {**TWO, "coarse_budget": 1.0}, prompts)
    assert one == two and st1["centroid_bytes"] == st1["centroid_bytes_flat"]


@pytest.mark.parametrize("args,msg", [({"levels": 3}, "levels must be 1 or 2"),
                                      ({"coarse": 0}, "coarse must be a share"),
                                      ({"budget": 0.5, "coarse_budget": 0.3}, "coarse_budget must be in")])
def test_bad_level_settings_are_one_line(args, msg):
    with pytest.raises(ValueError, match=msg):
        KV_POLICIES.get("squeezed")(**args)
