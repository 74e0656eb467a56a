"""The speculative-decoding extension point.

A proposer drafts tokens for running decode sequences at the end of a step (stored in
``seq.draft_ids``); the scheduler then gives each such sequence 1 + k tokens, the target model
scores them in the same batched step as everything else, and :meth:`Proposer.verify` decides
what is kept. The KV of rejected drafts is rolled back by advancing the sequence only by what
was accepted (the slots are overwritten later).

A proposer never holds the engine: it is built from a :class:`ProposerContext` (the target
model, the engine config, limits) and is given, after each step, the sequences to draft for,
the step's scheduler output and the runner's output (logits and the hidden states of the
layers it asked for in ``hidden_layers``: what self-speculative and hidden-state drafts
such as Kangaroo or Chimera read). Drafts may form a tree (``seq.draft_parents``): the target
verifies every branch in the same step with a tree attention mask.

How to add a method: subclass :class:`Proposer`, implement ``propose`` (and ``verify`` if the
acceptance rule differs), register with ``@SPEC_METHODS.register("name")``, add it to the
parametrized test in tests/engine/test_spec.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from slimlm.engine.sampling import top_logprobs
from slimlm.engine.spec.verify import target_probs, verify_greedy, verify_sampled, verify_tree_greedy
from slimlm.errors import SlimLMError
from slimlm.registry import Registry

if TYPE_CHECKING:
    from slimlm.engine.config import EngineConfig
    from slimlm.engine.request import Sequence
    from slimlm.engine.runner import RunnerOutput
    from slimlm.engine.sched_output import SchedulerOutput
    from slimlm.model.transformer import CausalLM


@dataclass
class ProposerContext:
    """What a proposer may know of the engine it serves."""

    target: CausalLM
    config: EngineConfig
    context_length: int
    vocab_size: int
    tokenizer: object | None = None
    """The target's tokenizer (a draft model must share it), None when the model has none."""


class Proposer(ABC):
    name: ClassVar[str]

    max_batch: int | None = None
    """Speculation off in steps with more than this many decoding sequences (None: never off):
    a batched target forward is no longer memory bound, so the extra rows of a verification
    cost nearly their full price while rejected drafts earn nothing (vLLM's
    ``disable_by_batch_size``). Set by every method's ``max_batch`` argument."""

    def set_max_batch(self, max_batch: int | None) -> None:
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise SlimLMError(f"speculative max_batch must be a positive number of sequences or None, got {max_batch!r}")
        self.max_batch = max_batch

    passes = 0
    """Draft network calls so far (a proposer that counts them: the draft cost per call)."""

    step_result: RunnerOutput | None = None
    """The runner's output of the step being verified (set by the engine before ``verify``):
    the hidden states of the verified rows, for acceptance rules that read them (Judge)."""

    def hidden_layers(self) -> list[int]:
        """Layers whose entering hidden states (of the rows with logits) the runner output
        should carry for this proposer (``num_layers`` = the final hidden state)."""
        return []

    def kv_bytes(self, total: int) -> int:
        """Bytes of the engine's KV budget this proposer takes for itself."""
        return 0

    @abstractmethod
    def propose(self, seqs: list[Sequence], sched: SchedulerOutput | None = None,
                result: RunnerOutput | None = None) -> None:
        """Set ``seq.draft_ids`` (and ``seq.draft_probs`` for sampled requests, and
        ``seq.draft_parents`` for a tree) for each sequence. ``sched`` and ``result`` are the
        step that just ran (None before the first step)."""

    def observe(self, sched: SchedulerOutput | None, result: RunnerOutput | None) -> None:
        """Every step, before ``propose`` (also when nothing is proposed): the step's chunks and
        runner output, for a draft that keeps the target's features of every position."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished; free any state kept for it."""

    def verify(self, seq: Sequence, logits: torch.Tensor,
               parents: list[int] | None = None) -> tuple[list[int], list, list[int] | None]:
        """logits (1 + k, V) for [last token, drafts...] (``parents``: the tree, or None for a
        chain). Returns the tokens to append, their logprobs (dicts, or Nones), and for a tree
        the accepted node path (root first)."""
        drafts = seq.draft_ids
        params = seq.sampler.params
        path = None
        if parents is not None:
            if not params.greedy:
                raise RuntimeError("tree drafts are verified greedily only; sampled requests draft chains")
            toks, path = verify_tree_greedy(logits, seq.token_ids[-1:] + drafts, parents)
            rows = logits[path]
        elif params.greedy:
            toks = verify_greedy(logits, drafts)
            rows = logits[: len(toks)]
        else:
            toks = verify_sampled(target_probs(logits, params), seq.draft_probs, drafts, seq.sampler.generator)
            rows = logits[: len(toks)]
        seq.draft_ids, seq.draft_probs, seq.draft_parents = [], None, None
        seq.sampler.output_ids.extend(toks)
        if params.logprobs is None:
            return toks, [None] * len(toks), path
        lp = rows.float().log_softmax(-1)
        return toks, top_logprobs(lp, torch.tensor(toks, device=lp.device), params.logprobs), path


SPEC_METHODS: Registry[Proposer] = Registry("speculative method")
