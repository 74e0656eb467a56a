"""Draft-model speculative decoding: a small model with the same tokenizer drafts k tokens.

The draft model runs batched over all drafting sequences with its own paged KV cache (a slice
of the engine's KV budget). Its cache keeps the tokens it has seen; after verification only
the prefix that still matches the sequence is kept (rollback), the rest is recomputed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimlm.engine.paged_attention import PagedKVCache
from slimlm.engine.runner import ModelRunner
from slimlm.engine.sched_output import ScheduledChunk, SchedulerOutput
from slimlm.engine.spec.base import SPEC_METHODS, Proposer
from slimlm.engine.spec.verify import target_probs
from slimlm.errors import SlimLMError
from slimlm.kvcache.block_pool import BlockPool
from slimlm.kvcache.manager import KVCacheManager
from slimlm.kvcache.policy.base import AttentionSpan

if TYPE_CHECKING:
    from slimlm.engine.engine import LLMEngine
    from slimlm.engine.request import Sequence


@SPEC_METHODS.register("draft")
class DraftModelProposer(Proposer):
    def __init__(self, engine: LLMEngine, model, k: int = 4, kv_fraction: float = 0.2):
        from slimlm.model.hub import LoadedModel, load

        if k < 1:
            raise ValueError(f"speculative k must be at least 1, got {k}")
        self.engine, self.k, self.kv_fraction = engine, k, kv_fraction
        self.lm = model if isinstance(model, LoadedModel) else load(model, engine.config.dtype, engine.config.device)
        self.vocab = engine.model.cfg.vocab_size
        if self.lm.model.cfg.vocab_size > self.vocab:
            raise SlimLMError(
                f"draft model vocab ({self.lm.model.cfg.vocab_size}) is larger than the target's ({self.vocab})"
            )
        self.computed: dict[int, int] = {}
        self.basis: dict[int, list[int]] = {}

    def kv_bytes(self, total: int) -> int:
        cfg, bs = self.lm.model.cfg, self.engine.config.block_size
        per_block = PagedKVCache.bytes_per_block(cfg, bs, self.lm.model.dtype)
        n = max(int(total * self.kv_fraction) // per_block, 4)
        self.kv = KVCacheManager(BlockPool(n, bs, enable_prefix_caching=False))
        cache = PagedKVCache(cfg, n, bs, self.lm.model.dtype, self.lm.model.device)
        self.runner = ModelRunner(self.lm.model, cache, AttentionSpan(), [], self.engine.config.native_kernels)
        return n * per_block

    def release(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        self.computed.pop(seq.seq_id, None)
        self.basis.pop(seq.seq_id, None)

    def _budget(self, seq: Sequence) -> int:
        p = seq.request.params
        room = min(p.max_tokens - len(seq.output_ids), self.engine.context_length - seq.num_tokens) - 1
        return 0 if seq.sampler.needs_penalties else max(0, min(self.k, room))

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> None:
        active = {}
        for seq in seqs:
            k = self._budget(seq)
            seq.draft_ids, seq.draft_probs = [], None
            if k == 0:
                continue
            sid = seq.seq_id
            basis = self.basis.get(sid, [])
            valid = self.computed.get(sid, 0)
            for i in range(max(0, valid - self.k - 2), valid):  # rollback to the matching prefix
                if i >= seq.num_tokens or basis[i] != seq.token_ids[i]:
                    valid = i
                    break
            self.computed[sid] = min(valid, seq.num_tokens - 1)  # recompute >= 1 token for its logits
            active[sid] = (seq, k)
        probs: dict[int, list[torch.Tensor]] = {sid: [] for sid in active}
        for step in range(self.k):
            chunks, live = [], []
            for sid, (seq, k) in active.items():
                if step >= k:
                    continue
                toks = seq.token_ids + seq.draft_ids
                if not self.kv.allocate(sid, len(toks)):
                    self.release(seq)
                    continue
                start = self.computed[sid]
                chunks.append(ScheduledChunk(sid, toks[start:], start, list(self.kv.tables[sid]), 1))
                live.append(seq)
                self.computed[sid] = len(toks)
                self.basis[sid] = toks
            if not chunks:
                break
            chunks.sort(key=lambda c: len(c.token_ids) != 1)
            logits = self.runner.execute(SchedulerOutput(chunks))
            for seq in live:
                row = logits[seq.seq_id][-1:]
                if row.shape[-1] < self.vocab:
                    row = torch.nn.functional.pad(row, (0, self.vocab - row.shape[-1]), value=float("-inf"))
                params = seq.request.params
                if params.greedy:
                    tok = int(row.argmax())
                else:
                    q = target_probs(row, params)[0]
                    tok = int(torch.multinomial(q, 1, generator=seq.sampler.generator))
                    probs[seq.seq_id].append(q)
                seq.draft_ids.append(tok)
        for sid, (seq, _) in active.items():
            if probs.get(sid) and seq.draft_ids:
                seq.draft_probs = torch.stack(probs[sid][: len(seq.draft_ids)])
