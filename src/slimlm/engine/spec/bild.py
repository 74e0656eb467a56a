"""Big Little Decoder (Kim et al. 2023): a small model decodes alone while it is confident.

The small model (any model slimlm loads with the target's tokenizer) generates tokens by
itself while its top-1 probability stays at or above ``fallback`` (the fallback policy); when
it drops below, control falls back to the large model. The large model then runs over the
small model's tokens at once and applies the rollback policy: the first small-model token the
large model disagrees with by more than ``rollback`` (the cross-entropy -log p_large(token),
in nats) is replaced by the large model's own token and everything after it is discarded.
Tokens the large model merely prefers differently but within the rollback distance are kept:
BiLD is lossy by design, traded against speed.

In the batched engine the large model's pass is the ordinary verification step (several
sequences, each with its own number of small-model tokens, in one forward). Documented
simplification: the small model's run per step is capped at ``k`` tokens, after which the
large model runs even if the small one is still confident (the paper has no cap).
Sampled requests keep a small-model token x when -log p_large(x) <= rollback, with p_large
the request's own sampling distribution, and otherwise draw from p_large.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from slimlm.engine.sampling import top_logprobs
from slimlm.engine.spec.base import SPEC_METHODS, ProposerContext
from slimlm.engine.spec.draft_model import DraftModelProposer
from slimlm.engine.spec.kangaroo import check_threshold
from slimlm.engine.spec.verify import target_probs
from slimlm.errors import SlimLMError

if TYPE_CHECKING:
    from slimlm.engine.request import Sequence

@SPEC_METHODS.register("bild")
class BiLDProposer(DraftModelProposer):
    def __init__(self, ctx: ProposerContext, model=None, fallback: float = 0.5, rollback: float = 2.0, k: int = 8,
                 kv_fraction: float = 0.2, max_batch: int | None = None):
        """``model``: the small model (name, directory, .gguf or a loaded model); ``fallback``:
        in [0, 1]; ``rollback``: cross-entropy threshold in nats, > 0; ``k``: most small-model
        tokens per large-model step."""
        if model is None:
            raise SlimLMError("speculative='bild' needs a small model: speculative_args={'model': NAME_OR_DIR}")
        check_threshold("bild fallback", fallback)
        if not isinstance(rollback, (int, float)) or not 0.0 < float(rollback) < math.inf:
            raise SlimLMError(f"bild rollback must be a positive number of nats, got {rollback!r}")
        super().__init__(ctx, model, k=k, kv_fraction=kv_fraction, max_batch=max_batch)
        self.fallback, self.rollback = float(fallback), float(rollback)

    def _stop(self, seq: Sequence, row: torch.Tensor, step: int) -> bool:
        return float(row[0].float().softmax(-1).max()) < self.fallback

    def verify(self, seq: Sequence, logits: torch.Tensor, parents=None):
        drafts, params = seq.draft_ids, seq.sampler.params
        if params.greedy:
            lp = logits.float().log_softmax(-1)
        else:
            lp = target_probs(logits, params).clamp_min(1e-30).log()
        toks: list[int] = []
        for i, d in enumerate(drafts + [None]):
            if d is not None and -float(lp[i, d]) <= self.rollback:
                toks.append(d)
                continue
            if params.greedy:
                toks.append(int(lp[i].argmax()))
            else:
                toks.append(int(torch.multinomial(lp[i].exp(), 1, generator=seq.sampler.generator)))
            break
        seq.draft_ids, seq.draft_probs, seq.draft_parents = [], None, None
        seq.sampler.output_ids.extend(toks)
        if params.logprobs is None:
            return toks, [None] * len(toks), None
        rows = logits[: len(toks)].float().log_softmax(-1)
        return toks, top_logprobs(rows, torch.tensor(toks, device=rows.device), params.logprobs), None
