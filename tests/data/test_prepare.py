"""`data prepare`, token files, sources and tokenizer training."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from slimlm.cli import main
from slimlm.data import prepare as prep
from slimlm.data.sources import CORPORA, is_heldout, resolve
from slimlm.data.tokens import TokenDataset
from slimlm.errors import SlimLMError
from slimlm.tokenizer import Tokenizer
from tests.data.conftest import make_corpus


def test_documents_round_trip_with_separator_and_split(prepared, tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    train, val = TokenDataset(prepared, "train"), TokenDataset(prepared, "val")
    meta = train.meta
    assert meta.dtype == "uint16" and meta.eos_id == tok.tok.token_to_id("<|endoftext|>")
    assert train.n_docs + val.n_docs == 40 and 0 < val.n_docs < 20
    src = resolve(str(prepared.parent / "text"))
    docs = list(src.documents())
    expect_train = [d for d in docs if not is_heldout(d.name, 0.2)]
    assert len(expect_train) == train.n_docs
    for i in (0, 7, train.n_docs - 1):
        ids = train.doc(i)
        assert ids[-1] == meta.eos_id and meta.eos_id not in ids[:-1]
        assert tok.decode(ids[:-1].tolist()) == expect_train[i].text
    assert meta.tokens["train"] == train.n_tokens == int(train.lengths.sum())


def test_heldout_split_depends_on_name_only():
    names = [f"src:file{i}.py" for i in range(2000)]
    held = [n for n in names if is_heldout(n, 0.1)]
    assert 150 < len(held) < 250
    assert held == [n for n in reversed(names) if is_heldout(n, 0.1)][::-1]


def test_prepare_resumes_after_a_kill_to_identical_files(tmp_path, tokenizer_dir, monkeypatch):
    text = make_corpus(tmp_path / "text", n_docs=12)
    prep.prepare([str(text)], tokenizer_dir, tmp_path / "ref", 0.25, chunk_docs=3, progress=False)
    calls = {"n": 0}
    real = prep.TokenWriter.flush

    def dying_flush(self):
        calls["n"] += 1
        if calls["n"] == 5:  # third chunk, second split: half of the chunk is flushed
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(prep.TokenWriter, "flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([str(text)], tokenizer_dir, tmp_path / "got", 0.25, chunk_docs=3, progress=False)
    monkeypatch.setattr(prep.TokenWriter, "flush", real)
    assert (tmp_path / "got" / "progress.json").is_file() and not (tmp_path / "got" / "meta.json").exists()
    prep.prepare([str(text)], tokenizer_dir, tmp_path / "got", 0.25, chunk_docs=3, progress=False)
    for f in ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy", "meta.json"):
        assert filecmp.cmp(tmp_path / "ref" / f, tmp_path / "got" / f, shallow=False), f
    # a finished folder is not redone; different settings are refused
    prep.prepare([str(text)], tokenizer_dir, tmp_path / "got", 0.25, progress=False)
    with pytest.raises(SlimLMError, match="other sources"):
        prep.prepare([str(text)], tokenizer_dir, tmp_path / "got", 0.5, progress=False)


def test_bad_sources(tmp_path, tokenizer_dir):
    with pytest.raises(SlimLMError, match="python-stdlib"):
        resolve(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(SlimLMError, match="no text"):
        prep.prepare([str(tmp_path / "empty")], tokenizer_dir, tmp_path / "out", progress=False)
    with pytest.raises(SlimLMError, match="not prepared"):
        TokenDataset(tmp_path / "empty")


def test_python_stdlib_corpus_is_code():
    src = CORPORA.get("python-stdlib")()
    assert len(src.files) > 500 and all(f.suffix == ".py" for f in src.files[:50])
    assert not any("site-packages" in f.parts for f in src.files)
    assert "python-docs" in CORPORA and "shakespeare" in CORPORA


def test_uint32_for_big_vocabularies():
    from slimlm.data.tokens import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_cli_tokenizer_train_and_prepare(tmp_path, capsys):
    import transformers

    text = make_corpus(tmp_path / "text", n_docs=20)
    assert main(["tokenizer", "train", str(text), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size == 300
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf("quick brown robots")["input_ids"] == tok.encode("quick brown robots")
    rc = main(["data", "prepare", str(text), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 0 and TokenDataset(tmp_path / "d").n_tokens > 1000
    capsys.readouterr()
    rc = main(["data", "prepare", str(tmp_path / "nope"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err
