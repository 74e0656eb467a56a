"""A tiny model that has learnt something (so a broken configuration can lose it), and tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import CORPUS, make_hf_model

TEXT = "".join(CORPUS)


def train_tiny(path: Path, steps: int = 120, seq: int = 64, batch: int = 8) -> Path:
    """A tiny Llama trained for a few seconds on the fixture corpus (its perplexity there drops
    from ~400 to near 1), saved as a Hugging Face directory with the fixture tokenizer."""
    import transformers

    from slimlm.tokenizer import Tokenizer

    make_hf_model(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from 2 threads, and a shared CPU costs them a lot
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor(Tokenizer.from_dir(path).encode(TEXT, add_special_tokens=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq] for s in starts])  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.save_pretrained(path)
    return path


def write_data(d: Path) -> dict[str, Path]:
    """A corpus file, a filler file and a BIG-bench-format task.json built from the corpus."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "corpus.txt").write_text(TEXT)
    (d / "filler.txt").write_text(TEXT * 3)
    examples = [
        {"input": "The quick brown fox jumps over the", "target_scores": {"lazy dog.": 1, "little robot who": 0}},
        {"input": "Small language models are fast to", "target_scores": {"serve and cheap to train.": 1,
                                                                       "jumps over the lazy dog.": 0}},
        {"input": "Once upon a time, there was a little", "target_scores": {"robot who loved to read books.": 1,
                                                                          "brown fox jumps.": 0}},
        {"input": "Paged attention stores keys and values in", "target_scores": {"fixed-size blocks": 1,
                                                                                "a little robot": 0, "the lazy dog": 0}},
    ]
    task = {"name": "tiny_mc", "examples": examples, "example_input_prefix": "", "example_output_prefix": " ",
            "append_choices_to_input": False}
    (d / "task.json").write_text(json.dumps(task))
    return {"corpus": d / "corpus.txt", "filler": d / "filler.txt", "task": d / "task.json"}
