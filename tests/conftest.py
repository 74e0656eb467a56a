"""Shared fixtures: tiny random models built with transformers, and a tiny trained tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
# Processes the tests start (ray heads and workers, torch.distributed ranks, CLI runs) share the 2
# cores with this one: OpenMP threads that spin at every region's end then slow each other
# many-fold (docs/benchmarks.md, "threads on a busy machine"); sleeping waits change no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# dtype="auto" would pick bf16 on CPUs with AVX512-BF16 / AMX: tests compare with fp32 references
os.environ.setdefault("SLIMLM_AUTO_DTYPE", "float32")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "def add(a, b):\n    return a + b\n",
    "Small language models are fast to serve and cheap to train. ",
    "Paged attention stores keys and values in fixed-size blocks 12345. ",
    "Once upon a time, there was a little robot who loved to read books.",
] * 20
VOCAB = 384  # model vocab; the tokenizer has a few less tokens


def make_tokenizer_json(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML, "add_bos_token": False,
    }))
    return path


def hf_config(kind: str, **overrides):
    import transformers

    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    base.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[kind]
    if kind == "mistral":
        base.setdefault("sliding_window", None)
    return cls(**base)


def make_hf_model(path: Path, kind: str = "llama", seed: int = 0, **overrides):
    """Save a random transformers model (+ tokenizer) to ``path``; returns the transformers model."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # make outputs less uniform than the tiny default init
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    make_tokenizer_json(path)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model(path, "llama")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model as an HF directory (converted once into the slimlm cache)."""
    from slimlm.errors import ModelLoadError
    from slimlm.model.hub import KNOWN_MODELS, ensure_cached

    try:
        return ensure_cached(KNOWN_MODELS["smollm2-135m-instruct"])
    except ModelLoadError as e:
        pytest.skip(str(e))
