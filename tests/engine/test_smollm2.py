"""The engine on the real default model: same greedy text as the reference decoder."""

from __future__ import annotations

import pytest

from slimlm import LLM, SamplingParams
from slimlm.engine.reference import ReferenceDecoder
from slimlm.model.hub import load


@pytest.mark.integration
def test_engine_matches_reference_on_smollm2(smollm2_dir):
    lm = load("smollm2-135m-instruct")
    tok = lm.tokenizer
    questions = ["What is the capital of France?", "Name a prime number.", "Say hello in Spanish."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in questions]
    params = SamplingParams(temperature=0, max_tokens=24)
    llm = LLM(lm, max_num_batched_tokens=32, block_size=16, kv_cache_bytes=64 << 20)
    outs = llm.generate(prompts, params, use_tqdm=False)
    dec = ReferenceDecoder(lm.model, lm.stop_token_ids())
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == [e.token_id for e in dec.stream(p, params)]
    assert "Paris" in outs[0].outputs[0].text
    assert llm.engine.stats["computed_prompt_tokens"] < sum(map(len, prompts))  # shared system prompt reused
