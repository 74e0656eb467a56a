"""The reference decoder: one sequence, a contiguous KV cache, no batching.

It is deliberately simple: the batching engine is tested against it. ``Decoder`` is the
small interface both implement for the CLI: ``stream(prompt_ids, params)`` yields token events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from slimlm.engine.params import SamplingParams
from slimlm.engine.sampling import SequenceSampler, sample_next
from slimlm.model.attention import attention, build_mask
from slimlm.model.transformer import CausalLM


@dataclass
class TokenEvent:
    token_id: int
    logprobs: dict[int, float] | None
    finish_reason: str | None = None
    """'stop' (a stop token) or 'length' (max_tokens or the context is full) on the last token."""


class Decoder(Protocol):
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]: ...


class ContiguousKVCache:
    """Per-layer (1, Hkv, S_max, d) buffers filled left to right; keys sit at positions 0..len-1."""

    def __init__(self, model: CausalLM, max_len: int):
        cfg = model.cfg
        shape = (1, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]
        self.windows = model.windows()
        self.scale = model.attn_scale
        self.length = 0
        self.q_pos: torch.Tensor | None = None

    def begin(self, position_ids: torch.Tensor) -> None:
        self.q_pos = position_ids  # (1, T)

    def end(self) -> None:
        self.length += self.q_pos.shape[1]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[2]
        end = self.length + T
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        window = self.windows.get(layer)
        mask = None
        if T > 1 or (window is not None and end > window):
            k_pos = torch.arange(end, device=q.device)[None]
            mask = build_mask(self.q_pos, k_pos, window=window)
        return attention(q, self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask, self.scale)


class ReferenceDecoder:
    def __init__(self, model: CausalLM, stop_token_ids: list[int] | None = None):
        self.model = model
        self.stop_token_ids = list(stop_token_ids or [])

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        model = self.model
        ctx = model.cfg.context_length
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= ctx:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {ctx}")
        max_new = min(params.max_tokens, ctx - len(prompt_ids))
        cache = ContiguousKVCache(model, len(prompt_ids) + max_new)
        sampler = SequenceSampler(params, prompt_ids, device=model.device)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.stop_token_ids))
        ids = torch.tensor([prompt_ids], device=model.device)
        for i in range(max_new):
            pos = torch.arange(cache.length, cache.length + ids.shape[1], device=model.device)[None]
            cache.begin(pos)
            logits = model(ids, pos, cache, logits_index=torch.tensor([[ids.shape[1] - 1]], device=model.device))
            cache.end()
            (tok,), (lp,) = sample_next(logits[:, -1], [sampler])
            finish = "stop" if tok in stops else ("length" if i == max_new - 1 else None)
            yield TokenEvent(tok, lp, finish)
            if finish:
                return
            ids = torch.tensor([[tok]], device=model.device)
