"""Chimera-style light draft (Zeng et al. 2024): drafts from the target's own last hidden state
fused with the embeddings of the newest tokens.

The paper's draft has a *trigram encoder* (the embeddings of the last three tokens, for the
short-range dependencies), a *full-context decoder* (attention over the target's hidden states
of the whole prefix) and residual decoding heads. Documented simplification: the full-context
part is the target's final hidden state at the newest position it computed (which already
summarizes the whole prefix through the target's own attention), so the draft has no KV of its
own. Draft step j (0-based) predicts the token j + 1 places after the newest one from

    x_j = RMSNorm(h) + W_tri [e(t_{j-2}); e(t_{j-1}); e(t_j)] + p_j
    y_j = x_j + W_2 silu(W_1 x_j)                      (the fusion MLP, residual)
    logits_j = lm_head_S(RMSNorm(y_j))

with h the target's final hidden state (pre-norm) at the position that predicted the newest
token t_0, e() the target's (frozen) token embeddings, t_1.. the draft's own previous tokens,
p_j a learned embedding of the draft step and lm_head_S the target's LM head restricted to the
S most frequent tokens of the training text (stored with the adapter, as Kangaroo's). Only W_tri,
p, the MLP and the two norms are trained (``slimlm train-adapter --method chimera``, target
frozen): a few million parameters, and a draft step costs a small MLP and the head subset, for
every drafting sequence of the batch at once.

Verification is the ordinary lossless one (greedy: identical output; sampled: Leviathan et
al.'s rule). ``tree=True``: greedy requests also draft the runner-up token at the first position
as a second branch (verified in the same step under a tree mask). ``threshold`` stops drafting
for a sequence once the draft's top-1 probability falls below it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimlm.engine.spec.base import SPEC_METHODS, Proposer, ProposerContext
from slimlm.engine.spec.kangaroo import ADAPTER_CONFIG, check_threshold, load_adapter
from slimlm.engine.spec.verify import target_probs
from slimlm.errors import SlimLMError
from slimlm.model.transformer import RMSNorm

if TYPE_CHECKING:
    from slimlm.engine.request import Sequence


class ChimeraDraft(nn.Module):
    """The trained part: trigram encoder, step embedding, fusion MLP, norms."""

    def __init__(self, hidden_size: int, depth: int, eps: float = 1e-5, mlp_mult: int = 2):
        super().__init__()
        d = hidden_size
        self.depth = depth
        self.norm_h = RMSNorm(d, eps)
        self.tri = nn.Linear(3 * d, d, bias=False)
        self.step = nn.Embedding(depth, d)
        self.up = nn.Linear(d, mlp_mult * d, bias=False)
        self.down = nn.Linear(mlp_mult * d, d, bias=False)
        self.norm = RMSNorm(d, eps)
        nn.init.normal_(self.tri.weight, std=0.02 / 3**0.5)
        nn.init.normal_(self.step.weight, std=0.02)
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.down.weight)

    def forward(self, h: torch.Tensor, emb3: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """h (..., D) target hidden states; emb3 (..., 3D) the three newest tokens' embeddings
        (oldest first); step (...) draft step indices. Returns the normed draft state (..., D)."""
        x = self.norm_h(h) + self.tri(emb3) + self.step(step.clamp(max=self.depth - 1))
        x = x + self.down(nn.functional.silu(self.up(x)))
        return self.norm(x)


def adapter_decoder(adapter: str | None) -> str:
    """The ``decoder`` an adapter folder was trained with ("mlp" when it says none or is unreadable:
    loading it then gives the one-line error)."""
    if adapter is None:
        return "mlp"
    try:
        return json.loads((Path(adapter).expanduser() / ADAPTER_CONFIG).read_text()).get("decoder", "mlp")
    except (OSError, ValueError, AttributeError):
        return "mlp"


@SPEC_METHODS.register("chimera")
class ChimeraProposer(Proposer):
    def __init__(self, ctx: ProposerContext, adapter: str | None = None, k: int = 4, threshold: float = 0.0,
                 tree: bool = False, max_batch: int | None = None, cumulative: bool = False):
        """``adapter``: folder written by ``slimlm train-adapter --method chimera``; ``k``: most
        drafts per step; ``threshold``: drafting stops when the draft's top-1 probability falls
        below it (0 = never); ``cumulative``: compare the product of the draft's top-1
        probabilities so far instead (the chance the whole chain is right: an adaptive draft
        length); ``tree``: top-2 branching at the first draft (greedy requests); ``max_batch``:
        no drafting in steps with more decoding sequences."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative k must be at least 1, got {k}")
        check_threshold("chimera threshold", threshold)
        meta, state = load_adapter(adapter, "chimera", ctx.target)
        t = ctx.target
        self.ctx, self.k, self.threshold, self.tree = ctx, k, float(threshold), bool(tree)
        self.cumulative = bool(cumulative)
        self.set_max_batch(max_batch)
        tm = meta.get("token_map")
        self.token_map = torch.tensor(tm, dtype=torch.long, device=t.device) if tm else None
        w = t.lm_head.weight.detach()
        self.head_weight = w if self.token_map is None else w.index_select(0, self.token_map)
        self.embed = t.model.embed_tokens
        self.vocab = ctx.vocab_size
        self.layer = t.cfg.num_layers
        self._init_draft(meta, state)

    def __new__(cls, ctx: ProposerContext, adapter: str | None = None, *args, **kwargs):
        """An adapter trained with ``--decoder attention`` is served by the full-context
        decoder (``chimera_attn.py``); the adapter folder says which."""
        if cls is ChimeraProposer and adapter_decoder(adapter) == "attention":
            from slimlm.engine.spec.chimera_attn import ChimeraAttnProposer

            cls = ChimeraAttnProposer
        return super().__new__(cls)

    def _init_draft(self, meta: dict, state: dict) -> None:
        if meta.get("decoder", "mlp") != "mlp":
            raise SlimLMError(f"speculative={self.name!r} drafts with an MLP chimera adapter; this one has the "
                              f"{meta['decoder']!r} decoder (serve it with speculative='chimera')")
        t = self.ctx.target
        self.net = ChimeraDraft(t.cfg.hidden_size, int(meta["depth"]), t.cfg.rms_norm_eps, int(meta.get("mlp_mult", 2)))
        self.net.load_state_dict(state)
        self.net.to(device=t.device, dtype=t.dtype).requires_grad_(False)
        self.state: dict[int, tuple[torch.Tensor, int]] = {}  # seq -> (hidden, num_tokens it applies to)
        self.row: dict[int, int] = {}  # seq -> row of the last step's hidden states to read

    def hidden_layers(self) -> list[int]:
        return [self.layer]

    def release(self, seq: Sequence) -> None:
        self.state.pop(seq.seq_id, None)
        self.row.pop(seq.seq_id, None)

    def _budget(self, seq: Sequence) -> int:
        p = seq.request.params
        room = min(p.max_tokens - len(seq.output_ids), self.ctx.context_length - seq.num_tokens) - 1
        return 0 if seq.sampler.needs_penalties else max(0, min(self.k, room))

    def _full(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, S) head-subset logits as (B, V) over the target's vocabulary."""
        if self.token_map is None:
            if logits.shape[-1] < self.vocab:
                logits = nn.functional.pad(logits, (0, self.vocab - logits.shape[-1]), value=float("-inf"))
            return logits
        full = logits.new_full((logits.shape[0], self.vocab), float("-inf"))
        return full.index_copy_(1, self.token_map, logits)

    def _hidden(self, seq: Sequence, result) -> torch.Tensor | None:
        """The target's final hidden state at the position that predicted the newest token."""
        sid = seq.seq_id
        row = self.row.pop(sid, -1)
        got = None if result is None else result.hidden.get(sid)
        if got is not None and self.layer in got:
            self.state[sid] = (got[self.layer][row], seq.num_tokens)
        h, n = self.state.get(sid, (None, -1))
        return h if n == seq.num_tokens else None

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], sched=None, result=None) -> None:
        live, hs, hist, ks = [], [], [], []
        found = {seq.seq_id: self._hidden(seq, result) for seq in seqs}
        for seq in seqs:
            seq.draft_ids, seq.draft_probs, seq.draft_parents = [], None, None
            h = found[seq.seq_id]
            if h is None:  # a sample forked this step (n > 1) shares its parent's prompt row
                h = next((found[o.seq_id] for o in seqs if o.request is seq.request and found[o.seq_id] is not None
                          and o.num_tokens == seq.num_tokens and o.token_ids[:-1] == seq.token_ids[:-1]), None)
            k = self._budget(seq)
            if h is None or k == 0 or seq.num_tokens < 1:
                continue
            live.append(seq)
            hs.append(h)
            toks = seq.token_ids[-3:]
            hist.append([toks[0]] * (3 - len(toks)) + toks)
            ks.append(k)
        if not live:
            return
        h = torch.stack(hs)
        hist_t = torch.tensor(hist, dtype=torch.long, device=h.device)  # (B, 3)
        alive = list(range(len(live)))
        probs: list[list[torch.Tensor]] = [[] for _ in live]
        conf = [1.0] * len(live)  # product of each chain's top-1 probabilities (``cumulative``)
        for j in range(self.k):
            alive = [i for i in alive if j < ks[i]]
            if not alive:
                break
            idx = torch.tensor(alive, device=h.device)
            emb = self.embed(hist_t[idx]).flatten(1)
            step = torch.full((len(alive),), j, dtype=torch.long, device=h.device)
            y = self.net(h[idx], emb, step)
            self.passes += 1
            logits = self._full(nn.functional.linear(y, self.head_weight))
            nxt, keep = [], []
            for r, i in enumerate(alive):
                seq = live[i]
                row = logits[r : r + 1]
                if self.threshold > 0:
                    p = float(row[0].float().softmax(-1).max())
                    conf[i] = conf[i] * p if self.cumulative else p
                    if conf[i] < self.threshold:
                        continue  # early exit: this and later drafts are not proposed
                params = seq.request.params
                if params.greedy:
                    top = row[0].topk(2).indices.tolist()
                    tok = top[0]
                    if j == 0 and self.tree:
                        seq.draft_parents = [top[1]]  # the branch token, placed below
                else:
                    q = target_probs(row, params)[0]
                    tok = int(torch.multinomial(q, 1, generator=seq.sampler.generator))
                    probs[i].append(q)
                seq.draft_ids.append(tok)
                nxt.append(tok)
                keep.append(i)
            if keep:
                ki = torch.tensor(keep, device=h.device)
                hist_t[ki] = torch.cat([hist_t[ki, 1:], torch.tensor(nxt, device=h.device)[:, None]], 1)
            alive = keep
        for i, seq in enumerate(live):
            if probs[i]:
                seq.draft_probs = torch.stack(probs[i])
            if seq.draft_parents is not None:
                branch = seq.draft_parents[0]
                n = len(seq.draft_ids)
                seq.draft_parents = [-1] + list(range(n - 1)) + [-1]
                seq.draft_ids = seq.draft_ids + [branch]

    def verify(self, seq: Sequence, logits: torch.Tensor, parents: list[int] | None = None):
        toks, lps, path = super().verify(seq, logits, parents)
        self.row[seq.seq_id] = path[-1] if path is not None else len(toks) - 1
        return toks, lps, path
