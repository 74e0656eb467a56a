"""Deterministic prompts built from real text that is on every machine (the Python stdlib)."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path


def stdlib_text(max_chars: int = 3_000_000) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for f in sorted(root.glob("*.py")):
        t = f.read_text(errors="ignore")
        parts.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return "\n".join(parts)


def mixed_prompts(tokenizer, n: int = 64, lo: int = 50, hi: int = 1500, system_tokens: int = 400,
                  shared_fraction: float = 0.5, seed: int = 0) -> list[list[int]]:
    """``n`` prompts with lengths uniform in [lo, hi]; a ``shared_fraction`` of them start with
    the same ``system_tokens``-token system prompt (then their own text)."""
    rng = random.Random(seed)
    ids = tokenizer.encode(stdlib_text(), add_special_tokens=False)
    system = ids[:system_tokens]
    pool = ids[system_tokens:]
    prompts = []
    for i in range(n):
        shared = i < int(n * shared_fraction)
        length = rng.randint(max(lo, system_tokens + 50) if shared else lo, hi)
        body_len = length - (system_tokens if shared else 0)
        start = rng.randrange(0, len(pool) - body_len)
        prompts.append((system if shared else []) + pool[start : start + body_len])
    rng.shuffle(prompts)
    return prompts


def text_prompt(tokenizer, n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of real text (the stdlib's .py files in sorted order, from token ``offset``):
    the same ids for every system given the same tokenizer."""
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for f in sorted(root.glob("*.py")):
        ids += tokenizer.encode(f.read_text(errors="ignore") + "\n", add_special_tokens=False)
        if len(ids) >= offset + n:
            return ids[offset : offset + n]
    raise ValueError(f"the stdlib holds fewer than {offset + n} tokens")


def lengths_prompts(tokenizer, lengths: list[int], spacing: int = 10_000) -> list[list[int]]:
    """One prompt per length, each from its own stretch of text (no shared prefixes)."""
    if not lengths:
        return []
    spacing = max(spacing, max(lengths))
    ids = text_prompt(tokenizer, spacing * (len(lengths) - 1) + lengths[-1])
    return [ids[i * spacing : i * spacing + n] for i, n in enumerate(lengths)]
