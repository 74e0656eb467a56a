"""slimlm's model reproduces transformers: logits and greedy continuations."""

from __future__ import annotations

import pytest
import torch

from slimlm.engine.params import SamplingParams
from slimlm.engine.reference import ReferenceDecoder
from slimlm.model.hub import load
from tests.conftest import make_hf_model

PROMPTS = [[5, 17, 99, 3, 250, 7, 7, 12], [44], [300, 201, 9, 9, 9, 11, 120, 61, 33, 2, 18, 19, 70, 81], [8, 80]]

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "mistral": ("mistral", {}),
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    "rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "rope-dynamic": ("llama", {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}),
    "rope-llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "rope-yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 64}}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(tmp_path, variant):
    kind, overrides = VARIANTS[variant]
    ref = make_hf_model(tmp_path, kind, **overrides)
    lm = load(tmp_path)
    assert lm.config.model_type == kind
    with torch.no_grad():
        # each prompt alone
        for p in PROMPTS:
            ids = torch.tensor([p])
            assert rel_err(lm.model(ids), ref(ids).logits) < 1e-4
        # all prompts packed in one row: positions restart, segments keep them apart
        flat = torch.tensor([sum(PROMPTS, [])])
        pos = torch.tensor([sum((list(range(len(p))) for p in PROMPTS), [])])
        seg = torch.tensor([sum(([i] * len(p) for i, p in enumerate(PROMPTS)), [])])
        packed = lm.model(flat, pos, segment_ids=seg)
        expected = torch.cat([ref(torch.tensor([p])).logits[0] for p in PROMPTS])
        assert rel_err(packed[0], expected) < 1e-4
    # greedy continuation of 32 tokens, token for token
    dec = ReferenceDecoder(lm.model)
    for p in PROMPTS[:2]:
        ours = [e.token_id for e in dec.stream(p, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))]
        ids = torch.tensor([p])
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, min_new_tokens=32, pad_token_id=0)[0, len(p):].tolist()
        assert ours == theirs


def test_bf16_close_to_fp32(tiny_llama_dir):
    a, b = load(tiny_llama_dir), load(tiny_llama_dir, dtype="bf16")
    assert b.model.dtype == torch.bfloat16
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert rel_err(b.model(ids).float(), a.model(ids)) < 5e-2


@pytest.mark.integration
def test_smollm2_greedy_matches_transformers(smollm2_dir):
    import transformers

    lm = load("smollm2-135m-instruct")
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = lm.tokenizer
    dec = ReferenceDecoder(lm.model)
    prompts = ["The capital of France is", "def fibonacci(n):",
               tok.apply_chat_template([{"role": "user", "content": "Name three colors."}])]
    for text in prompts:
        p = tok.encode(text)
        ours = [e.token_id for e in dec.stream(p, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))]
        ids = torch.tensor([p])
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(p):].tolist()
        assert ours == theirs, text
