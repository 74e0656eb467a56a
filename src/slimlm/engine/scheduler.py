"""The scheduler: who runs this step, and how many tokens each computes. No tensors.

One step: ``schedule()`` -> runner -> ``update()``. Rules, in order:

1. Running sequences, decodes first (SARATHI decode-maximal batching), then prefills that are
   partway through, each taking a chunk of what is left of the step's token budget.
2. When the KV pool cannot grow a running sequence, the latest-arrived running sequence is
   preempted: its blocks are freed and it waits at the head of the queue to be recomputed
   (prompt + what it already generated), so nothing is lost and outputs do not change.
3. Waiting sequences are admitted in order while budget and blocks last; the prefix cache
   supplies what it already holds. With ``dedup_prefixes`` (BatchLLM), a sequence whose next
   block is being computed right now by another one waits a step instead of computing it too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from slimlm.engine.request import Sequence, SeqStatus
from slimlm.engine.sched_output import ScheduledChunk, SchedulerOutput
from slimlm.kvcache.block_pool import block_hashes
from slimlm.kvcache.manager import KVCacheManager
from slimlm.kvcache.policy.base import KVPolicy


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        policy: KVPolicy | None = None,
        dedup_prefixes: bool = False,
        num_drafts: Callable[[Sequence], int] | None = None,
    ):
        self.kv = kv
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.policy = policy
        self.dedup_prefixes = dedup_prefixes
        self.num_drafts = num_drafts or (lambda seq: 0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pending_copies: list[tuple[int, int]] = []
        self._inflight: dict[int, int] = {}  # block hash -> seq computing it this step
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, copies: list[tuple[int, int]]) -> None:
        """A forked sequence whose blocks are already set up (its prompt KV is shared)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._pending_copies += copies

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def max_blocks(self, seq: Sequence) -> int:
        """Blocks ``seq`` needs at most, whole prompt plus all output."""
        total = self.kv.blocks_for(seq.prompt_len + seq.request.params.max_tokens)
        if self.policy is not None:
            bound = self.policy.max_blocks(self.budget, self.kv.block_size)
            if bound is not None:
                total = min(total, bound)
        return total

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_copies=self._pending_copies)
        self._pending_copies = []
        budget = self.budget
        self._inflight = {}
        queue = [s for s in self.running if s.is_decode] + [s for s in self.running if not s.is_decode]
        scheduled: set[int] = set()
        while queue and budget > 0:
            seq = queue.pop(0)
            if seq.status != SeqStatus.RUNNING:
                continue  # preempted while we went
            if seq.is_decode:
                n = 1 + min(self.num_drafts(seq), budget - 1)
            else:
                n = min(seq.num_uncomputed, budget)
            while not self.kv.allocate(seq.seq_id, seq.num_stored + n):
                victim = self._pick_victim(exclude=scheduled)
                if victim is None:
                    break
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != SeqStatus.RUNNING:
                continue
            if self.kv.num_new_blocks(seq.seq_id, seq.num_stored + n) > 0:
                continue  # could not grow it even alone; retry next step
            out.chunks.append(self._chunk(seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        # admit waiting sequences
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            table = self.kv.tables.get(seq.seq_id)
            if seq.request.params.prompt_logprobs is None and seq.num_computed == len(table or []) * self.kv.block_size \
                    and not seq.kv_preset:
                # nothing computed beyond cached blocks: (re)match, which also picks up blocks that
                # a leader published while this sequence waited (BatchLLM dedup); prompt
                # logprobs need every row computed
                cached = self.kv.match_prefix(seq.seq_id, seq.token_ids)
                seq.num_computed = cached
                if seq.index == 0 and seq.num_tokens == seq.prompt_len:
                    seq.request.num_cached_tokens = cached
            if self.dedup_prefixes and self._next_block_inflight(seq):
                skipped.append(seq)
                continue
            n = min(seq.num_uncomputed, budget)
            if not self.kv.allocate(seq.seq_id, seq.num_stored + n):
                if not seq.kv_preset and seq.num_computed == len(self.kv.tables.get(seq.seq_id) or []) \
                        * self.kv.block_size:
                    # it holds only matched cache blocks: give them back (they stay cached and are
                    # matched again at the next try). Kept, they would pin blocks no running
                    # sequence can use, and waiting sequences holding each other's share of the
                    # pool would stall the engine with nothing running.
                    self.kv.free(seq.seq_id)
                    seq.num_computed = 0
                self.waiting.appendleft(seq)
                break
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(self._chunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        out.chunks.sort(key=lambda c: len(c.token_ids) != 1)  # single-token chunks first (runner batches them)
        return out

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        completes = seq.num_computed + n >= seq.num_tokens
        drafts = 0
        parents = None
        if seq.is_decode and n > 1:  # the decode token followed by drafts to verify
            seq.draft_ids = seq.draft_ids[: n - 1]  # a tree stays a tree: parents precede children
            if seq.draft_probs is not None:
                seq.draft_probs = seq.draft_probs[: n - 1]
            if seq.draft_parents is not None:
                seq.draft_parents = seq.draft_parents[: n - 1]
                parents = [-1] + [p + 1 for p in seq.draft_parents]  # index 0 is the last token
            tokens = seq.token_ids[-1:] + seq.draft_ids
            drafts = n - 1
        else:
            tokens = seq.token_ids[seq.num_computed : seq.num_computed + n]
        num_logits = n if drafts else int(completes)
        if seq.request.params.prompt_logprobs is not None and seq.num_computed < seq.prompt_len:
            num_logits = n  # every prompt position scores the token after it
        forks = seq.request.params.n if (seq.index == 0 and completes and not seq.output_ids) else 1
        if self.dedup_prefixes:
            for h in self._hashes(seq)[seq.num_computed // self.kv.block_size :
                                       (seq.num_computed + n) // self.kv.block_size]:
                self._inflight.setdefault(h, seq.seq_id)
        return ScheduledChunk(seq.seq_id, tokens, seq.num_computed, list(self.kv.tables[seq.seq_id]),
                              num_logits, completes, drafts, forks, tree_parents=parents,
                              kv_start=seq.num_stored, prompt_len=seq.prompt_len, layout=seq.request.layout)

    def _hashes(self, seq: Sequence) -> list[int]:
        if seq.block_hashes is None or len(seq.block_hashes) < seq.num_tokens // self.kv.block_size:
            seq.block_hashes = block_hashes(seq.token_ids, self.kv.block_size)
        return seq.block_hashes

    def _next_block_inflight(self, seq: Sequence) -> bool:
        hashes = self._hashes(seq)
        i = seq.num_computed // self.kv.block_size
        return i < len(hashes) and hashes[i] in self._inflight

    def _pick_victim(self, exclude: set[int]) -> Sequence | None:
        for seq in reversed(self.running):
            if seq.seq_id not in exclude:
                return seq
        return None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed = seq.kv_dropped = 0
        seq.kv_preset = False  # recomputed as an ordinary prefill
        if self.policy is not None:
            self.policy.reset(seq.seq_id)
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        out.preempted.append(seq.seq_id)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ update
    def update(self, out: SchedulerOutput, accepted: dict[int, int]) -> None:
        """After the runner: advance each scheduled sequence by the tokens whose KV is now
        valid (``accepted`` overrides for verified drafts), publish full blocks, apply the KV
        policy. Runs before the engine appends this step's sampled tokens."""
        by_id = {s.seq_id: s for s in self.running}
        for c in out.chunks:
            seq = by_id.get(c.seq_id)
            if seq is None or seq.status != SeqStatus.RUNNING:
                continue
            n = accepted.get(c.seq_id, len(c.token_ids))  # accepted tree paths were moved to the front
            seq.num_computed = c.start + n
            known = seq.token_ids if c.start + n <= seq.num_tokens else seq.token_ids[: c.start] + c.token_ids
            self.kv.commit(seq.seq_id, known, seq.num_computed)
            if self.policy is not None and self.policy.granularity == "block":
                drop = self.policy.blocks_to_evict(seq.num_computed, self.kv.tables[seq.seq_id], self.kv.block_size)
                if drop:
                    self.kv.evict(seq.seq_id, drop)

    def finish(self, seq: Sequence) -> None:
        seq.status = SeqStatus.FINISHED
        self.kv.free(seq.seq_id)
        if self.policy is not None:
            self.policy.reset(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
