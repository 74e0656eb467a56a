"""Judge Decoding (Bachmann et al. 2025): accept correct drafts that exact verification rejects.

Standard verification rejects a draft token as soon as it differs from the target's choice,
even when it is a perfectly good continuation. The judge is a small linear head on the
target's own final hidden state ("embedding") of each draft token, i.e. the state the
verification pass computes anyway at the position where the draft token is the input; it
scores whether the token is a correct continuation. Greedy verification then accepts draft i
when it equals the target's argmax *or* the judge's probability is >= ``accept``; at the first
draft that neither holds for, the target's own token replaces it, as usual.

Lossy by design (greedy outputs may differ from plain decoding); sampled requests keep the
ordinary lossless rule. Drafts come from the Chimera light draft (``adapter``; see
``chimera.py``), the judge from ``slimlm train-adapter --method judge`` (target frozen).

Training (documented simplification of the paper's labelled data set): on offline text, a
ground-truth token is "correct" and a plausible wrong token (drawn from the target's top-5 at
that position, excluding the text's token) is "incorrect"; the head is fit on the target's
final hidden state at the token's position in the clean and in the corrupted text (pairs with
the same context), by logistic regression.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from slimlm.engine.sampling import top_logprobs
from slimlm.engine.spec.base import SPEC_METHODS, ProposerContext
from slimlm.engine.spec.chimera import ChimeraProposer
from slimlm.engine.spec.kangaroo import check_threshold, load_adapter
from slimlm.errors import SlimLMError

if TYPE_CHECKING:
    from slimlm.engine.request import Sequence


class JudgeHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm_scale = nn.Parameter(torch.ones(hidden_size))
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) final hidden states -> (...) logits of "correct"."""
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_scale
        return self.linear(h).squeeze(-1)


@SPEC_METHODS.register("judge")
class JudgeProposer(ChimeraProposer):
    def __init__(self, ctx: ProposerContext, head: str | None = None, adapter: str | None = None, k: int = 4,
                 accept: float = 0.999, threshold: float = 0.0, max_batch: int | None = None):
        """``head``: folder from ``slimlm train-adapter --method judge``; ``adapter``: the
        Chimera draft (``--method chimera``); ``accept``: judge probability in (0, 1] above
        which a mismatched draft is kept (1 = exact verification; the default 0.999 was chosen
        by a sweep on SmolLM2-135M, docs/techniques.md: lower values traded task quality for
        tokens per step); ``threshold``: the draft's early exit, as Chimera's."""
        check_threshold("judge accept", accept)
        if float(accept) <= 0.0:
            raise SlimLMError("judge accept must be in (0, 1]: 0 would accept every draft")
        if head is None:
            raise SlimLMError("speculative='judge' needs a trained judge head: speculative_args={'head': DIR, "
                              "'adapter': CHIMERA_DIR}; train one with `slimlm train-adapter --method judge`")
        meta, state = load_adapter(head, "judge", ctx.target)
        super().__init__(ctx, adapter=adapter, k=k, threshold=threshold, tree=False, max_batch=max_batch)
        self.judge = JudgeHead(ctx.target.cfg.hidden_size)
        self.judge.load_state_dict({k_: v.float() for k_, v in state.items()})
        self.judge.to(ctx.target.device).requires_grad_(False)
        self.accept = float(accept)
        self.counts = {"judge_accepted": 0}

    @torch.inference_mode()
    def verify(self, seq: Sequence, logits: torch.Tensor, parents: list[int] | None = None):
        params = seq.sampler.params
        res = self.step_result
        hid = None if res is None else res.hidden.get(seq.seq_id, {}).get(self.layer)
        if not params.greedy or parents is not None or hid is None or hid.shape[0] != logits.shape[0]:
            return super().verify(seq, logits, parents)
        drafts = seq.draft_ids
        best = logits.argmax(-1).tolist()
        ok = (torch.sigmoid(self.judge(hid[1 : len(drafts) + 1])) >= self.accept).tolist() if self.accept < 1.0 \
            else [False] * len(drafts)
        toks = []
        for i, d in enumerate(drafts):
            if d == best[i]:
                toks.append(d)
            elif ok[i]:
                toks.append(d)
                self.counts["judge_accepted"] += 1
            else:
                toks.append(best[i])
                break
        else:
            toks.append(best[len(drafts)])
        seq.draft_ids, seq.draft_probs, seq.draft_parents = [], None, None
        seq.sampler.output_ids.extend(toks)
        self.row[seq.seq_id] = len(toks) - 1
        if params.logprobs is None:
            return toks, [None] * len(toks), None
        lp = logits[: len(toks)].float().log_softmax(-1)
        return toks, top_logprobs(lp, torch.tensor(toks, device=lp.device), params.logprobs), None
