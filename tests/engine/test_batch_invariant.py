"""bf16 decoding whose rows round the same at any batch size (``EngineConfig.batch_invariant``).

On the CPU a reduced-precision matmul of one row takes another kernel than one of several rows
and rounds differently (seen with a 1,536-wide down projection), and a chain verification pass
attends through the prefill kernel rather than the decode one. Near-ties then flip: plain greedy
decoding changed between batch 1 and batch 4, and speculative output left plain decoding even
with the target as its own draft (SmolLM2-135M, bf16: agreement 0.73 and 0.57).
"""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.model.hub import load
from tests.conftest import make_hf_model
from tests.engine.test_engine import make_prompts


@pytest.fixture(scope="module")
def wide_bf16(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide")
    make_hf_model(path, "llama", seed=5, intermediate_size=1536)
    return load(path, dtype="bfloat16")


def _greedy(llm, prompts, batch):
    """Tokens and the logprob of each (exact floats: equal only if every row rounded the same)."""
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    out = []
    for i in range(0, len(prompts), batch):
        for o in llm.generate(prompts[i : i + batch], p, use_tqdm=False):
            c = o.outputs[0]
            out.append([(t, lp[t]) for t, lp in zip(c.token_ids, c.logprobs)])
    return out


def test_bf16_greedy_is_the_same_at_batch_1_and_batch_4_and_under_speculation(wide_bf16):
    assert wide_bf16.model.dtype == torch.bfloat16
    prompts = make_prompts(8, seed=11)
    plain = LLM(wide_bf16)
    one, four = _greedy(plain, prompts, 1), _greedy(plain, prompts, 4)
    assert one == four
    spec = LLM(wide_bf16, speculative="draft", speculative_args={"model": wide_bf16, "k": 4})
    assert _greedy(spec, prompts, 1) == one
    assert _greedy(spec, prompts, 4) == one
    st = spec.engine.stats
    assert st["accepted_draft_tokens"] > 0
