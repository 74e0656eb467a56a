"""`slimlm data prepare`: tokenize sources into token files, resumably and deterministically.

Documents are read in a fixed order, tokenized in chunks, each followed by the end-of-document
token, and sent to ``train`` or ``val`` by a hash of their name. After each chunk the token
files are flushed and ``progress.json`` records how many documents are done, so a killed run
continues where it stopped and ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tqdm import tqdm

from slimlm.data.sources import Document, Source, is_heldout, resolve
from slimlm.data.tokens import META, TokenMeta, TokenWriter, token_dtype
from slimlm.errors import SlimLMError
from slimlm.tokenizer import Tokenizer

PROGRESS = "progress.json"
DOC_SEPARATORS = ("<|endoftext|>", "</s>", "<eos>")


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A known model name, a folder with tokenizer.json, or a tokenizer.json file."""
    from slimlm.model.hub import KNOWN_MODELS, ensure_cached

    if str(spec) in KNOWN_MODELS:
        return Tokenizer.from_dir(ensure_cached(KNOWN_MODELS[str(spec)]))
    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if not (path / "tokenizer.json").is_file():
        raise SlimLMError(f"tokenizer '{spec}' not found: expected a known model name or a folder with tokenizer.json")
    return Tokenizer.from_dir(path)


def tokenizer_sha256(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.tok.to_str().encode()).hexdigest()


def document_separator(tok: Tokenizer) -> int:
    """The token that ends every document: <|endoftext|> (or </s>, <eos>) if present, else EOS."""
    for t in DOC_SEPARATORS:
        if (i := tok.tok.token_to_id(t)) is not None:
            return i
    if tok.eos_token_id is None:
        raise SlimLMError("the tokenizer has no end-of-document token (<|endoftext|>, </s>, <eos> or an EOS)")
    return tok.eos_token_id


def _documents(sources: list[Source], max_docs: int | None):
    for s in sources:
        for i, d in enumerate(s.documents()):
            if max_docs is not None and i >= max_docs:
                break
            yield d


def prepare(
    sources: list[str],
    tokenizer: str | Path,
    out: str | Path,
    val_fraction: float = 0.01,
    max_docs: int | None = None,
    chunk_docs: int = 256,
    progress: bool = True,
) -> TokenMeta:
    if not sources:
        raise SlimLMError("no sources given")
    if not 0 <= val_fraction < 1:
        raise SlimLMError(f"val fraction must be in [0, 1), got {val_fraction}")
    resolved = [resolve(s) for s in sources]
    tok = load_tokenizer(tokenizer)
    out = Path(out)
    args = {
        "sources": sources, "tokenizer_sha256": tokenizer_sha256(tok),
        "val_fraction": val_fraction, "max_docs": max_docs,
    }
    state = _resume_state(out, args)
    if state is None:
        return TokenMeta.load(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(_fresh(out / "tokenizer"))
    dtype = token_dtype(tok.vocab_size)
    eos = document_separator(tok)
    writers = {s: TokenWriter(out, s, dtype, keep_docs=state["docs"][s]) for s in ("train", "val")}
    total = sum(len(s.files) if max_docs is None else min(max_docs, len(s.files)) for s in resolved)
    bar = tqdm(total=total, initial=state["done"], unit="doc", desc=f"prepare {out.name}", disable=not progress)
    chunk: list[Document] = []
    done = state["done"]
    docs = _documents(resolved, max_docs)
    for _ in range(done):  # documents already written by an earlier run
        next(docs, None)

    def write(chunk: list[Document]) -> None:
        nonlocal done
        encoded = tok.tok.encode_batch([d.text for d in chunk], add_special_tokens=False)
        for d, enc in zip(chunk, encoded):
            writers["val" if is_heldout(d.name, val_fraction) else "train"].add([*enc.ids, eos])
        for w in writers.values():
            w.flush()
        done += len(chunk)
        _write_json(out / PROGRESS, {"args": args, "done": done, "docs": {s: len(w.offsets) - 1 for s, w in writers.items()}})
        bar.update(len(chunk))

    for d in docs:
        chunk.append(d)
        if len(chunk) == chunk_docs:
            write(chunk)
            chunk = []
    if chunk:
        write(chunk)
    bar.close()
    for w in writers.values():
        w.close()
    counts = {s: len(w.offsets) - 1 for s, w in writers.items()}
    if counts["train"] == 0 or writers["train"].offsets[-1] == 0:
        raise SlimLMError(f"no text found in {', '.join(sources)}: nothing to train on")
    meta = TokenMeta(
        vocab_size=tok.vocab_size, dtype=dtype.name, eos_id=eos, tokenizer_sha256=args["tokenizer_sha256"],
        sources=sources, val_fraction=val_fraction, docs=counts,
        tokens={s: w.offsets[-1] for s, w in writers.items()},
    )
    meta.save(out)
    (out / PROGRESS).unlink()
    return meta


def _resume_state(out: Path, args: dict) -> dict | None:
    """None when ``out`` is already prepared with ``args``; else where to continue from."""
    fresh = {"done": 0, "docs": {"train": 0, "val": 0}}
    if (out / META).is_file():
        meta = TokenMeta.load(out)
        same = (meta.sources, meta.tokenizer_sha256, meta.val_fraction) == (
            args["sources"], args["tokenizer_sha256"], args["val_fraction"])
        if same:
            return None
        raise SlimLMError(f"{out} already holds data prepared from other sources or tokenizer; choose another --out")
    if (out / PROGRESS).is_file():
        prog = json.loads((out / PROGRESS).read_text())
        if prog.get("args") != args:
            raise SlimLMError(f"{out} holds an unfinished preparation with other settings; delete it or choose another --out")
        return prog
    ours = {"tokenizer", "train.bin", "val.bin", "train.idx.npy", "val.idx.npy", PROGRESS + ".tmp"}
    if out.exists() and any(p.name not in ours for p in out.iterdir()):
        raise SlimLMError(f"{out} exists and is not a data folder; choose another --out")
    return fresh


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
