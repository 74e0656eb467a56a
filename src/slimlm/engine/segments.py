"""Prompts given as segments, and Set-Based Prompting (McIlroy-Young et al. 2024,
"Order-Independence Without Fine Tuning").

A prompt may be a list of segments instead of one text::

    LLM.generate([{"segments": ["Question: ...\\n",
                                {"set": ["- option one\\n", "- option two\\n", "- option three\\n"]},
                                "Answer:"]}])

- a string (or ``{"text": str}``, or ``{"ids": [int, ...]}``) is ordinary text;
- ``{"chunk": text}`` (or ``{"chunk": {"ids": [...]}}``) is text whose KV is kept and reused
  wherever it appears in later prompts, blended in by CacheBlend (``engine/cacheblend.py``);
- ``{"set": [element, ...]}`` (two or more elements, each a string / ``{"text"}`` / ``{"ids"}``)
  is an unordered set: every element starts at the same position (the set's start) and no
  element's tokens attend to another element's tokens. Whatever follows the set starts after
  the longest element and sees all of them. The output is then the same for every order of the
  elements (up to floating-point summation order; greedy outputs are identical, tested).

Each segment is tokenized on its own (no special tokens) and the token ids are concatenated;
:class:`PromptLayout` records each prompt token's RoPE position and set membership. The engine
stores tokens in the given order (storage index != position inside a set); the runner rotates
by the layout's positions and masks cross-element pairs, and a layout's prefix-cache blocks
are salted with the layout (its KV depends on more than its tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptLayout:
    positions: tuple[int, ...]
    """RoPE position of each prompt token."""
    sets: tuple[int, ...]
    """Set id of each prompt token (-1: not in a set)."""
    elements: tuple[int, ...]
    """Element index within its set (-1: not in a set)."""
    chunks: tuple[tuple[int, int], ...] = ()
    """(start, end) token spans of reusable chunks (CacheBlend, ``engine/cacheblend.py``)."""

    @property
    def has_sets(self) -> bool:
        return any(s >= 0 for s in self.sets)

    @property
    def span(self) -> int:
        """Positions the prompt occupies (the largest + 1): what the context check counts."""
        return max(self.positions) + 1

    def positions_for(self, start: int, n: int) -> list[int]:
        """Positions of tokens start .. start + n - 1 (prompt tokens, then generated ones)."""
        plen, nxt = len(self.positions), self.span
        return [self.positions[i] if i < plen else nxt + i - plen for i in range(start, start + n)]

    def in_set(self, start: int, n: int) -> bool:
        return any(s >= 0 for s in self.sets[start : start + n])

    def digest(self) -> str:
        h = hashlib.sha256(repr((self.positions, self.sets, self.elements, self.chunks)).encode())
        return "layout:" + h.hexdigest()


def _piece(seg: Any, encode: Callable[[str], list[int]], where: str) -> list[int]:
    if isinstance(seg, str):
        ids = encode(seg)
    elif isinstance(seg, dict) and set(seg) == {"text"} and isinstance(seg["text"], str):
        ids = encode(seg["text"])
    elif isinstance(seg, dict) and set(seg) == {"ids"} and isinstance(seg["ids"], list):
        ids = [int(t) for t in seg["ids"]]
    else:
        raise ValueError(f"{where}: a segment is a string, {{'text': str}}, {{'ids': [int]}} or "
                         f"{{'set': [...]}}, got {str(seg)[:60]!r}")
    if not ids:
        raise ValueError(f"{where} is empty")
    return ids


def build_segments(segments: Any, encode: Callable[[str], list[int]]) -> tuple[list[int], PromptLayout | None]:
    """Token ids and layout of a segment list (layout None when there is no set: a plain prompt)."""
    if not isinstance(segments, list) or not segments:
        raise ValueError("segments must be a non-empty list")
    ids: list[int] = []
    pos: list[int] = []
    sets: list[int] = []
    elems: list[int] = []
    p = 0
    chunks: list[tuple[int, int]] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, dict) and "chunk" in seg:
            if set(seg) != {"chunk"}:
                raise ValueError(f"segment {i}: a chunk is {{'chunk': text}} or {{'chunk': {{'ids': [...]}}}}")
            t = _piece(seg["chunk"], encode, f"segment {i}")
            chunks.append((len(ids), len(ids) + len(t)))
            ids += t
            pos += range(p, p + len(t))
            sets += [-1] * len(t)
            elems += [-1] * len(t)
            p += len(t)
        elif isinstance(seg, dict) and "set" in seg:
            members = seg["set"]
            if set(seg) != {"set"} or not isinstance(members, list):
                raise ValueError(f"segment {i}: a set is {{'set': [element, ...]}}")
            if len(members) < 2:
                raise ValueError(f"segment {i}: a set needs at least 2 elements, got {len(members)}")
            sid = max(sets, default=-1) + 1
            longest = 0
            for e, m in enumerate(members):
                if isinstance(m, dict) and "set" in m:
                    raise ValueError(f"segment {i}: sets cannot be nested")
                t = _piece(m, encode, f"segment {i} element {e}")
                ids += t
                pos += range(p, p + len(t))
                sets += [sid] * len(t)
                elems += [e] * len(t)
                longest = max(longest, len(t))
            p += longest
        else:
            t = _piece(seg, encode, f"segment {i}")
            ids += t
            pos += range(p, p + len(t))
            sets += [-1] * len(t)
            elems += [-1] * len(t)
            p += len(t)
    layout = PromptLayout(tuple(pos), tuple(sets), tuple(elems), tuple(chunks))
    if chunks and layout.has_sets:
        raise ValueError("a prompt cannot have both chunks and sets")
    return ids, layout if layout.has_sets or chunks else None


def chat_segments(messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str],
                  encode_template: Callable[[str], list[int]], encode_text: Callable[[str], list[int]]) -> list[Any]:
    """Chat messages, each with ``content`` (text) or ``segments`` (a segment list), as one
    segment list: the chat template's own text around every message, the messages' segments in
    their places. ``render`` applies the template to messages; template text is encoded with
    ``encode_template`` (control tokens), message text with ``encode_text``."""
    import secrets

    nonce = secrets.token_hex(8)
    marks = [f"\u2063{nonce}:{i}\u2063" for i in range(len(messages))]
    text = render([{**m, "content": k} for m, k in zip(messages, marks)])
    out: list[Any] = []
    for i, (mark, m) in enumerate(zip(marks, messages)):
        before, found, text = text.partition(mark)
        if not found or mark in text:
            raise ValueError("this model's chat template transforms message content, so segments cannot be "
                             "placed in it")
        if before:
            out.append({"ids": encode_template(before)})
        segs = m.get("segments")
        if segs is not None:
            if m.get("content"):
                raise ValueError(f"message {i}: give 'content' or 'segments', not both")
            if not isinstance(segs, list) or not segs:
                raise ValueError(f"message {i}: segments must be a non-empty list")
            out += segs
        elif m.get("content"):
            out.append({"ids": encode_text(m["content"])})
    if text:
        out.append({"ids": encode_template(text)})
    return [s for s in out if s != {"ids": []}]


def set_allow_mask(layout: PromptLayout, q_idx, k_idx):
    """(T, S) bool: may query storage index q_idx[t] see key k_idx[s] as far as sets go
    (False when both are in the same set but in different elements). Indices past the prompt
    (generated tokens) and padding (-1) are in no set."""
    import torch

    n = len(layout.sets)
    sets = torch.tensor(list(layout.sets) + [-1], device=q_idx.device)  # index n = "no set"
    elems = torch.tensor(list(layout.elements) + [-1], device=q_idx.device)
    qi = torch.where((q_idx >= 0) & (q_idx < n), q_idx, n)
    ki = torch.where((k_idx >= 0) & (k_idx < n), k_idx, n)
    qs, ks, qe, ke = sets[qi][:, None], sets[ki][None, :], elems[qi][:, None], elems[ki][None, :]
    return ~((qs == ks) & (qs >= 0) & (qe != ke))


def prepare(engine, prompt: Any, params) -> tuple[list[int], PromptLayout | None]:
    """A ``{"segments": [...]}`` prompt -> (token ids, layout), validated against ``engine``."""
    if set(prompt) != {"segments"}:
        raise ValueError(f"a dict prompt has one key, 'segments'; got {sorted(prompt)}")
    tok = engine.tokenizer
    if tok is None and _has_text(prompt["segments"]):
        raise ValueError("segments hold text but the model has no tokenizer; use {'ids': [...]}")
    ids, layout = build_segments(prompt["segments"], lambda t: tok.encode(t, add_special_tokens=False))
    span = layout.span if layout is not None else len(ids)
    ctx = engine.context_length
    if span < ctx < span + params.max_tokens:
        raise ValueError(f"segments ({span} positions) + max_tokens ({params.max_tokens}) is past the model's "
                         f"context of {ctx} tokens; use max_tokens <= {ctx - span}")
    return engine.validate(ids, params, layout), layout


def _has_text(segments: Any) -> bool:
    if not isinstance(segments, list):
        return False
    for s in segments:
        if isinstance(s, str) or (isinstance(s, dict) and "text" in s):
            return True
        if isinstance(s, dict) and isinstance(s.get("set"), list) and _has_text(s["set"]):
            return True
        if isinstance(s, dict) and "chunk" in s and _has_text([s["chunk"]]):
            return True
    return False
