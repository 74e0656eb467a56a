"""Draft-model speculative decoding: a small model with the same tokenizer drafts k tokens.

The draft model runs batched over all drafting sequences with its own paged KV cache (a slice
of the engine's KV budget). Its cache keeps the tokens it has seen; after verification only
the prefix that still matches the sequence is kept (rollback), the rest is recomputed.

With ``tree=True`` greedy requests draft a small tree: the chain of the draft's argmax tokens
plus, at the first draft position, the draft's second choice as another branch (top-2
branching: when the draft's first guess is wrong, its runner-up often is right). The target
verifies both branches in the same step under a tree attention mask; output stays identical.
A sequence whose draft cache runs short simply gets no drafts this step (plain decoding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimlm.engine.paged_attention import AttentionPaths
from slimlm.engine.runner import ModelRunner
from slimlm.engine.sched_output import ScheduledChunk, SchedulerOutput
from slimlm.engine.spec.base import SPEC_METHODS, Proposer, ProposerContext
from slimlm.engine.spec.verify import target_probs
from slimlm.errors import SlimLMError
from slimlm.kvcache.block_pool import BlockPool
from slimlm.kvcache.manager import KVCacheManager
from slimlm.kvcache.policy.base import AttentionSpan
from slimlm.kvcache.spec import KVCacheSpec
from slimlm.kvcache.storage import PagedKVCache

if TYPE_CHECKING:
    from slimlm.engine.request import Sequence


PROBE = "The quick brown fox, 12345 + def f(x): return x**2  # naïve café ✓"


def check_same_tokenizer(ctx: ProposerContext, lm, method: str) -> None:
    """One-line error when the small model's tokenizer is not the target's."""
    a, b = ctx.tokenizer, lm.tokenizer
    if a is None or b is None:
        return
    if a.vocab_size != b.vocab_size or a.encode(PROBE) != b.encode(PROBE) or a.tok.get_vocab() != b.tok.get_vocab():
        raise SlimLMError(f"speculative={method!r}: the small model's tokenizer differs from the target's "
                          f"({b.vocab_size} vs {a.vocab_size} tokens); use a model with the same tokenizer")


@SPEC_METHODS.register("draft")
class DraftModelProposer(Proposer):
    def __init__(self, ctx: ProposerContext, model, k: int = 4, kv_fraction: float = 0.2, tree: bool = False,
                 max_batch: int | None = None):
        """``max_batch``: no drafting in steps with more decoding sequences (``Proposer.max_batch``)."""
        from slimlm.model.hub import LoadedModel, load

        if k < 1:
            raise ValueError(f"speculative k must be at least 1, got {k}")
        if not 0.0 < kv_fraction < 1.0:
            raise ValueError(f"speculative kv_fraction must be in (0, 1), got {kv_fraction}")
        self.ctx, self.k, self.kv_fraction, self.tree = ctx, k, kv_fraction, bool(tree)
        self.set_max_batch(max_batch)
        self.lm = model if isinstance(model, LoadedModel) else load(model, ctx.config.dtype, ctx.config.device)
        self.vocab = ctx.vocab_size
        if self.lm.model.cfg.vocab_size > self.vocab:
            raise SlimLMError(
                f"draft model vocab ({self.lm.model.cfg.vocab_size}) is larger than the target's ({self.vocab})"
            )
        check_same_tokenizer(ctx, self.lm, self.name)
        self.computed: dict[int, int] = {}
        self.basis: dict[int, list[int]] = {}

    def kv_bytes(self, total: int) -> int:
        cfg, bs = self.lm.model.cfg, self.ctx.config.block_size
        spec = KVCacheSpec.from_model(cfg, self.lm.model.dtype)
        per_block = spec.bytes_per_block(bs)
        n = max(int(total * self.kv_fraction) // per_block, 4)
        self.kv = KVCacheManager(BlockPool(n, bs, enable_prefix_caching=False))
        cache = PagedKVCache(spec, n, bs, self.lm.model.device)
        paths = AttentionPaths.choose(cache, cfg.head_dim, AttentionSpan(), False, self.ctx.config.native_kernels)
        self.runner = ModelRunner(self.lm.model, cache, paths, [])
        return n * per_block

    def release(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        self.computed.pop(seq.seq_id, None)
        self.basis.pop(seq.seq_id, None)

    token_map: torch.Tensor | None = None
    """(S,) vocabulary ids of the draft head's S outputs when it scores only a subset of the
    vocabulary (the others get probability 0); None = the first columns of the vocabulary."""

    def _full_row(self, row: torch.Tensor) -> torch.Tensor:
        """The draft's logits (1, S) as (1, V) over the target's vocabulary (-inf elsewhere)."""
        if self.token_map is not None:
            full = row.new_full((1, self.vocab), float("-inf"))
            return full.index_copy_(1, self.token_map, row)
        if row.shape[-1] < self.vocab:
            row = torch.nn.functional.pad(row, (0, self.vocab - row.shape[-1]), value=float("-inf"))
        return row

    def _stop(self, seq: Sequence, row: torch.Tensor, step: int) -> bool:
        """Whether drafting stops for ``seq`` before proposing from ``row`` (1, V) at draft
        position ``step`` (an early exit on low confidence). Plain drafting never stops."""
        return False

    def _budget(self, seq: Sequence) -> int:
        p = seq.request.params
        room = min(p.max_tokens - len(seq.output_ids), self.ctx.context_length - seq.num_tokens) - 1
        return 0 if seq.sampler.needs_penalties else max(0, min(self.k, room))

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], sched: SchedulerOutput | None = None, result=None) -> None:
        active: dict[int, tuple[Sequence, int]] = {}
        for seq in seqs:
            k = self._budget(seq)
            seq.draft_ids, seq.draft_probs, seq.draft_parents = [], None, None
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
        second: dict[int, int] = {}  # runner-up token at the first draft position (tree drafts)
        stopped: set[int] = set()  # sequences whose drafting stopped early (``_stop``)
        for step in range(self.k):
            chunks, live = [], []
            for sid, (seq, k) in list(active.items()):
                if step >= k or sid in stopped:
                    continue
                toks = seq.token_ids + seq.draft_ids
                if not self.kv.allocate(sid, len(toks)):  # draft cache short: plain decoding this step
                    self.release(seq)
                    del active[sid]
                    continue
                start = self.computed[sid]
                chunks.append(ScheduledChunk(sid, toks[start:], start, list(self.kv.tables[sid]), 1))
                live.append(seq)
                self.computed[sid] = len(toks)
                self.basis[sid] = toks
            if not chunks:
                break
            chunks.sort(key=lambda c: len(c.token_ids) != 1)
            logits = self.runner.execute(SchedulerOutput(chunks)).logits
            self.passes += 1
            for seq in live:
                row = self._full_row(logits[seq.seq_id][-1:])
                params = seq.request.params
                if self._stop(seq, row, step):  # early exit: this and later drafts are not proposed
                    stopped.add(seq.seq_id)
                    continue
                if params.greedy:
                    top = row[0].topk(2).indices.tolist()
                    tok = top[0]
                    if step == 0 and self.tree:
                        second[seq.seq_id] = top[1]
                else:
                    q = target_probs(row, params)[0]
                    tok = int(torch.multinomial(q, 1, generator=seq.sampler.generator))
                    probs[seq.seq_id].append(q)
                seq.draft_ids.append(tok)
        for sid, (seq, _) in active.items():
            if probs.get(sid) and seq.draft_ids:
                seq.draft_probs = torch.stack(probs[sid][: len(seq.draft_ids)])
            if sid in second and seq.draft_ids:
                n = len(seq.draft_ids)  # chain: each node's parent is the previous one; then the branch
                seq.draft_parents = [-1] + list(range(n - 1)) + [-1]
                seq.draft_ids = seq.draft_ids + [second[sid]]
