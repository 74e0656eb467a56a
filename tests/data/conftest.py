"""Tiny corpora and prepared token folders, built by the tests themselves."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.conftest import CORPUS, make_tokenizer_json

WORDS = " ".join(CORPUS[:5]).split()


def make_corpus(path: Path, n_docs: int = 40, seed: int = 0, min_words: int = 5, max_words: int = 400) -> Path:
    """``n_docs`` text files of random length made of the shared test sentences' words."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = rng.randint(min_words, max_words)
        (path / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(n)) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer_json(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tokenizer_dir) -> Path:
    """A prepared folder: 40 documents (~9k tokens), 20% held out."""
    from slimlm.data.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    prepare([str(make_corpus(root / "text"))], tokenizer_dir, root / "tokens", val_fraction=0.2, progress=False)
    return root / "tokens"


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the tiny models are fastest so, and a busy shared machine does not oversubscribe."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
