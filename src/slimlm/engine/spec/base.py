"""The speculative-decoding extension point.

A proposer drafts tokens for running decode sequences at the end of a step (stored in
``seq.draft_ids``); the scheduler then gives each such sequence 1 + k tokens, the target model
scores them in the same batched step as everything else, and :meth:`Proposer.verify` decides
what is kept. The KV of rejected drafts is rolled back by advancing the sequence only by what
was accepted (the slots are overwritten later).

How to add a method: subclass :class:`Proposer`, implement ``propose`` (and ``verify`` if the
acceptance rule differs), register with ``@SPEC_METHODS.register("name")``, add it to the
parametrized test in tests/engine/test_spec.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from slimlm.engine.sampling import top_logprobs
from slimlm.engine.spec.verify import target_probs, verify_greedy, verify_sampled
from slimlm.registry import Registry

if TYPE_CHECKING:
    from slimlm.engine.request import Sequence


class Proposer(ABC):
    name: ClassVar[str]

    def kv_bytes(self, total: int) -> int:
        """Bytes of the engine's KV budget this proposer takes for itself."""
        return 0

    @abstractmethod
    def propose(self, seqs: list[Sequence]) -> None:
        """Set ``seq.draft_ids`` (and ``seq.draft_probs`` for sampled requests) for each sequence."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished; free any state kept for it."""

    def verify(self, seq: Sequence, logits: torch.Tensor) -> tuple[list[int], list]:
        """logits (1 + k, V) for [last token, drafts...]. Returns the tokens to append and their
        logprobs (dicts, or Nones)."""
        drafts = seq.draft_ids
        params = seq.sampler.params
        if params.greedy:
            toks = verify_greedy(logits, drafts)
        else:
            toks = verify_sampled(target_probs(logits, params), seq.draft_probs, drafts, seq.sampler.generator)
        seq.draft_ids, seq.draft_probs = [], None
        seq.sampler.output_ids.extend(toks)
        if params.logprobs is None:
            return toks, [None] * len(toks)
        lp = logits[: len(toks)].float().log_softmax(-1)
        return toks, top_logprobs(lp, torch.tensor(toks, device=lp.device), params.logprobs)


SPEC_METHODS: Registry[Proposer] = Registry("speculative method")
