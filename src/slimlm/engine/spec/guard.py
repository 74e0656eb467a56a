"""Failure isolation for proposers: a proposer that fails degrades one request to plain decoding.

The engine calls the proposer through :class:`ProposerGuard`. If ``propose`` raises for a
batch, every sequence's drafts are cleared and the sequences are proposed for one at a time
(after the proposer released their state, so nothing half-updated is reused); a sequence whose
proposal still fails is *disabled*: it decodes without drafts until it finishes. If ``verify``
raises (a bad draft: an id outside the vocabulary, malformed probabilities or tree), the
sequence is disabled the same way and the engine samples its next token from the first row of
the step's logits (the last accepted token's, computed exactly as in a plain decode step). Other
requests never see the failure. A proposer that runs out of its own KV already degrades by
itself (no drafts for that sequence this step).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from slimlm.engine.request import Sequence
    from slimlm.engine.spec.base import Proposer

log = logging.getLogger("slimlm.spec")


def _clear(seq: Sequence) -> None:
    seq.draft_ids, seq.draft_probs, seq.draft_parents = [], None, None


class ProposerGuard:
    def __init__(self, proposer: Proposer, vocab_size: int):
        self.proposer, self.vocab = proposer, vocab_size
        self.disabled: set[int] = set()
        self.failures = 0
        self.skipped_steps = 0
        """Steps without drafting because more sequences decoded than ``proposer.max_batch``."""

    def _disable(self, seq: Sequence, where: str, err: Exception) -> None:
        self.failures += 1
        self.disabled.add(seq.seq_id)
        _clear(seq)
        log.warning("proposer %s failed in %s for request %s (%s: %s); it continues without drafts",
                    self.proposer.name if hasattr(self.proposer, "name") else "?", where,
                    seq.request.request_id, type(err).__name__, err)
        try:
            self.proposer.release(seq)
        except Exception:  # noqa: BLE001 - the sequence is disabled anyway
            pass

    def propose(self, seqs: list[Sequence], sched=None, result=None) -> None:
        try:
            self.proposer.observe(sched, result)
        except Exception as e:  # noqa: BLE001 - no request depends on it yet: start its state over
            log.warning("proposer observe failed (%s: %s); its sequences restart their draft state", type(e).__name__, e)
            for s in seqs:
                self.proposer.release(s)
        for s in seqs:
            if s.seq_id in self.disabled:
                _clear(s)
        seqs = [s for s in seqs if s.seq_id not in self.disabled]
        if not seqs:
            return
        cap = self.proposer.max_batch
        if cap is not None and len(seqs) > cap:  # a plain step: the batch is too large to pay
            for s in seqs:
                _clear(s)
            self.skipped_steps += 1
            return
        try:
            self.proposer.propose(seqs, sched, result)
            for s in seqs:
                self._check(s)
            return
        except Exception:  # noqa: BLE001 - find which sequences fail, one at a time
            pass
        for s in seqs:
            _clear(s)
            try:
                self.proposer.release(s)
            except Exception:  # noqa: BLE001
                pass
        for s in seqs:
            try:
                self.proposer.propose([s], sched, result)
                self._check(s)
            except Exception as e:  # noqa: BLE001 - this request decodes plainly from now on
                self._disable(s, "propose", e)

    def _check(self, seq: Sequence) -> None:
        """Drafts the runner can run: ids in the vocabulary, one probability row per draft
        (sampled requests), a tree whose parents precede their children."""
        d = seq.draft_ids
        if not d:
            return
        if any(not isinstance(t, int) or not 0 <= t < self.vocab for t in d):
            raise ValueError(f"draft ids outside the vocabulary [0, {self.vocab})")
        if not seq.request.params.greedy and (seq.draft_probs is None or tuple(seq.draft_probs.shape) != (len(d), self.vocab)):
            raise ValueError("sampled drafts need draft_probs of shape (k, vocab)")
        par = seq.draft_parents
        if par is not None and (len(par) != len(d) or any(not -1 <= p < i for i, p in enumerate(par))):
            raise ValueError("draft tree parents must precede their children")

    def verify(self, seq: Sequence, logits: torch.Tensor, parents: list[int] | None):
        """The proposer's verification, or None when it failed (the caller decodes plainly)."""
        try:
            return self.proposer.verify(seq, logits, parents)
        except Exception as e:  # noqa: BLE001
            self._disable(seq, "verify", e)
            return None

    def release(self, seq: Sequence) -> None:
        self.disabled.discard(seq.seq_id)
        self.proposer.release(seq)
