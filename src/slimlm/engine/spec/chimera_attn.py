"""Chimera's full-context decoder (Zeng et al. 2024; EAGLE's one-layer draft, Li et al. 2024):
a draft with causal self-attention of its own over the target's final hidden states.

At position t the draft sees the target's final hidden state f_t (pre-norm, the state that
predicted token t + 1) and the embedding of token t + 1 (shifted by one, as EAGLE):

    x_t = W_in [e(tok_{t+1}); RMSNorm(f_t)]
    g_t = DecoderLayer(x_t)        one layer of the target's own architecture: RMSNorm, causal
                                   self-attention (RoPE at position t) over x_0..x_t, SwiGLU MLP
    logits_t = lm_head_S(norm(g_t))   the target's final norm and LM head (head subset)

g_t is trained to be f_{t+1} / RMS(f_{t+1}) (feature regression) and its logits to match the target's
distribution of token t + 2 (``slimlm train-adapter --method chimera --decoder attention``).
Drafting is autoregressive over the draft's own predicted features: the k-th draft at position
N - 2 + k reads (g of the previous draft, e(previous draft token)).

The draft's KV is a compact per-request cache (not the engine's paged pool: one layer of
keys and values, a few hundred bytes a token): positions whose target feature is known get a
key and value once; drafted positions are appended during ``propose`` and cut off after it.
The target's features of every row of a step (prefill chunks too) come from the runner
output (``hidden_layers`` asks for layer ``FEATURES`` = -1: the final hidden state of every
row). A request's cache is freed on release and on preemption (``SchedulerOutput.preempted``);
the recomputed prefill rebuilds it. Positions whose features the draft never saw (a prefix
served from the prefix cache, a hook that reorders rows) are skipped: the draft attends from
the first position it has onwards (still lossless; fewer tokens accepted at worst).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimlm.engine.spec.chimera import ChimeraProposer
from slimlm.engine.spec.verify import target_probs
from slimlm.errors import SlimLMError
from slimlm.model.transformer import DecoderLayer, RMSNorm

if TYPE_CHECKING:
    from slimlm.engine.request import Sequence
    from slimlm.model.config import ModelConfig

FEATURES = -1
"""The runner's ``capture`` entry for the final hidden state of every row of a step."""


class DraftKV:
    """The attention backend of the draft's layer: past keys/values ``ctx_k``/``ctx_v`` (B, Hkv,
    S, d) before the new rows' own, a boolean ``mask`` (B, T, S + T) of what each new row may
    see; keeps the new rows' keys and values (``new_k``, ``new_v``) for the caller."""

    def __init__(self, scale: float, mask: torch.Tensor, ctx_k: torch.Tensor | None = None,
                 ctx_v: torch.Tensor | None = None):
        self.scale, self.mask, self.ctx_k, self.ctx_v = scale, mask, ctx_k, ctx_v
        self.new_k = self.new_v = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rows=None) -> torch.Tensor:
        self.new_k, self.new_v = k, v  # (B, Hkv, T, d)
        if self.ctx_k is not None:
            k, v = torch.cat([self.ctx_k, k], 2), torch.cat([self.ctx_v, v], 2)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:, None], scale=self.scale,
                                                          enable_gqa=True)  # (B, Hq, T, d)


class AttnDraft(nn.Module):
    """The trained part: the input map and one decoder layer (shapes of the target's layers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm_f = RMSNorm(d, cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.layer = DecoderLayer(cfg, cfg.num_layers - 1)

    @classmethod
    def from_target(cls, target) -> AttnDraft:
        """A draft that starts as the identity on the feature: the input map passes f_t through,
        the layer's output projections are zero (its residual branches add nothing yet). (Copying
        the target's last layer instead learned slower: held-out agreement 0.20 / 0.12 / 0.10 per
        draft step after 300 steps, docs/techniques.md.)"""
        net = cls(target.cfg)
        d = target.cfg.hidden_size
        with torch.no_grad():
            for m in net.layer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(net.layer.self_attn.o_proj.weight)
            nn.init.zeros_(net.layer.mlp.down_proj.weight)
            nn.init.normal_(net.fc.weight, std=0.02)
            net.fc.weight[:, d:] = torch.eye(d)
        return net.to(target.dtype)

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: DraftKV) -> torch.Tensor:
        """emb, feat (B, T, D) -> predicted next features (B, T, D), RMS-normalized units (the
        target's final features are large, RMS ~37 with outlier dimensions near 400 on
        SmolLM2-135M; the head's norm makes the scale irrelevant to the logits)."""
        return self.layer(self.fc(torch.cat([emb, self.norm_f(feat)], -1)), cos, sin, kv)


@dataclass
class _Ctx:
    """One request's draft state: target features of positions base.. and the draft's KV."""

    base: int = 0
    feats: torch.Tensor | None = None  # (n, D) target features of positions base .. base + n - 1
    toks: list[int] = field(default_factory=list)  # the input token of each of those positions
    k: torch.Tensor | None = None  # (m, Hkv, d): draft keys of positions base .. base + m - 1 (m <= n)
    v: torch.Tensor | None = None
    ok: int = 0  # positions already checked against the sequence's tokens

    def cut_kv(self, m: int) -> None:
        if self.k is not None:
            self.k, self.v = (None, None) if m <= 0 else (self.k[:m], self.v[:m])

    def cut(self, n: int) -> None:
        """Keep the first ``n`` positions."""
        self.toks = self.toks[:n]
        self.ok = min(self.ok, max(n, 0))
        self.feats = None if n <= 0 or self.feats is None else self.feats[:n]
        self.cut_kv(n)


class ChimeraAttnProposer(ChimeraProposer):
    """``speculative="chimera"`` with an adapter trained with ``--decoder attention`` (chosen by
    ``ChimeraProposer`` from the adapter's ``decoder`` field). Chains only: ``tree`` is refused."""

    def _init_draft(self, meta: dict, state: dict) -> None:
        if self.tree:
            raise SlimLMError("chimera with an attention decoder drafts chains: tree=True is not supported")
        t = self.ctx.target
        self.net = AttnDraft(t.cfg)
        self.net.load_state_dict(state)
        self.net.to(device=t.device, dtype=t.dtype).requires_grad_(False)
        self.norm = t.model.norm
        self.rotary = t.rotary
        self.scale = t.attn_scale
        self.ctxs: dict[int, _Ctx] = {}
        self.pending: dict[int, list[tuple[int, list[int], torch.Tensor]]] = {}
        self.gone: set[int] = set()

    def hidden_layers(self) -> list[int]:
        return [FEATURES, self.layer]

    def release(self, seq: Sequence) -> None:
        self.ctxs.pop(seq.seq_id, None)
        self.pending.pop(seq.seq_id, None)
        self.gone.add(seq.seq_id)  # its last step's features arrive after the release: not kept

    def observe(self, sched, result) -> None:
        """Keep every chunk's target features (merged into the request's state at its next
        ``propose``); drop the state of preempted requests."""
        gone, self.gone = self.gone, set()
        if sched is None:
            return
        for sid in sched.preempted:
            self.ctxs.pop(sid, None)
            self.pending.pop(sid, None)
        if result is None:
            return
        for c in sched.chunks:
            got = result.hidden.get(c.seq_id)
            if got is None or c.tree_parents or c.seq_id in gone:
                continue
            T = len(c.token_ids)
            f = got.get(FEATURES)
            if f is None:  # only the rows with logits (the native decode path: all of a decode chunk)
                f = got.get(self.layer)
            if f is None or f.shape[0] == 0:
                continue
            s = c.start + T - f.shape[0]
            self.pending.setdefault(c.seq_id, []).append((s, c.token_ids[T - f.shape[0]:], f))

    def _merge(self, seq: Sequence) -> _Ctx:
        """The request's state with the features of the steps since its last ``propose``."""
        st = self.ctxs.setdefault(seq.seq_id, _Ctx())
        for s, toks, f in self.pending.pop(seq.seq_id, []):
            n = len(st.toks)
            if s < st.base or s > st.base + n:  # recomputed, or a gap: start over from s
                st.base, n = s, 0
            st.cut(s - st.base)
            st.toks = st.toks + list(toks)
            f = f.to(self.net.fc.weight.dtype)
            st.feats = f if st.feats is None else torch.cat([st.feats, f])
        return st

    @staticmethod
    def _valid(seq: Sequence, st: _Ctx) -> None:
        """Cut ``st`` to the positions whose input token is the sequence's own (rejected drafts
        go) and whose feature is final (<= N - 2)."""
        ids, n_ok = seq.token_ids, min(st.ok, len(st.toks))
        last = seq.num_tokens - 2
        while n_ok < len(st.toks) and st.base + n_ok <= last and st.toks[n_ok] == ids[st.base + n_ok]:
            n_ok += 1
        st.cut(n_ok)
        st.ok = n_ok

    def _run(self, emb: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor, ctx_k, ctx_v, ctx_len: list[int],
             new_len: list[int]):
        """One draft pass over padded rows: emb, feat (B, T, D), pos (B, T); past keys (B, S,
        Hkv, d) valid for ``ctx_len`` positions; the new rows valid for ``new_len``. Returns the
        predicted features (B, T, D) and the new keys/values (B, T, Hkv, d)."""
        B, T = pos.shape
        S = 0 if ctx_k is None else ctx_k.shape[1]
        dev = emb.device
        past = torch.arange(S, device=dev)[None] < torch.tensor(ctx_len, device=dev)[:, None]  # (B, S)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([past[:, None].expand(B, T, S), causal.expand(B, T, T)], -1)
        kv = DraftKV(self.scale, mask, None if ctx_k is None else ctx_k.transpose(1, 2),
                     None if ctx_v is None else ctx_v.transpose(1, 2))
        cos, sin = self.rotary(pos, emb.dtype)
        g = self.net(emb, feat, cos, sin, kv)
        self.passes += 1
        return g, kv.new_k.transpose(1, 2), kv.new_v.transpose(1, 2)

    @staticmethod
    def _pad(xs: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        xs = [like.new_zeros((0, *like.shape[1:])) if x is None else x for x in xs]
        return nn.utils.rnn.pad_sequence(xs, batch_first=True)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], sched=None, result=None) -> None:
        live, sts, ks = [], [], []
        got = {seq.seq_id: self._merge(seq) for seq in seqs}
        for seq in seqs:
            st = got[seq.seq_id]
            if not st.toks:  # a sample forked this step (n > 1): its parent's prompt features
                src = next((got[o.seq_id] for o in seqs if o.request is seq.request and got[o.seq_id].toks), None)
                if src is not None:
                    st = self.ctxs[seq.seq_id] = _Ctx(src.base, src.feats, list(src.toks), src.k, src.v)
                    st.ok = 0
            self._valid(seq, st)
        for seq in seqs:
            seq.draft_ids, seq.draft_probs, seq.draft_parents = [], None, None
            st = self.ctxs[seq.seq_id]
            k = self._budget(seq)
            if k == 0 or not st.toks or st.base + len(st.toks) != seq.num_tokens - 1:
                continue  # no feature at N - 2 (the first draft's input): plain decoding this step
            live.append(seq)
            sts.append(st)
            ks.append(k)
        if not live:
            return
        dev = self.head_weight.device
        # 1. catch-up: positions with a target feature and no draft KV yet (the last gives draft 1)
        news = [min(0 if st.k is None else len(st.k), len(st.toks) - 1) for st in sts]
        for st, m in zip(sts, news):
            st.cut_kv(m)
        new_len = [len(st.toks) - m for st, m in zip(sts, news)]
        feat = self._pad([st.feats[m:] for st, m in zip(sts, news)], sts[0].feats)
        nxt_ids = [seq.token_ids[st.base + m + 1 : st.base + len(st.toks) + 1] for seq, st, m in zip(live, sts, news)]
        T = max(new_len)
        ids = torch.tensor([x + [0] * (T - len(x)) for x in nxt_ids], dtype=torch.long, device=dev)
        pos = torch.tensor([[st.base + m + i for i in range(T)] for st, m in zip(sts, news)], device=dev)
        like = next((st.k for st in sts if st.k is not None), None)
        ck = None if like is None else self._pad([st.k for st in sts], like)
        cv = None if like is None else self._pad([st.v for st in sts], like)
        g, nk, nv = self._run(self.embed(ids), feat, pos, ck, cv, news, new_len)
        for b, st in enumerate(sts):
            n = new_len[b]
            st.k = nk[b, :n] if st.k is None else torch.cat([st.k, nk[b, :n]])
            st.v = nv[b, :n] if st.v is None else torch.cat([st.v, nv[b, :n]])
        h = g[torch.arange(len(live), device=dev), torch.tensor(new_len, device=dev) - 1]  # (B, D)
        committed = [len(st.toks) for st in sts]
        alive = list(range(len(live)))
        probs: list[list[torch.Tensor]] = [[] for _ in live]
        conf = [1.0] * len(live)
        for j in range(self.k):
            alive = [i for i in alive if j < ks[i]]
            if not alive:
                break
            if j > 0:  # a draft pass at the previous draft's position over its predicted feature
                idx = torch.tensor(alive, device=dev)
                ids = torch.tensor([[live[i].draft_ids[-1]] for i in alive], device=dev)
                pos = torch.tensor([[sts[i].base + len(sts[i].k)] for i in alive], device=dev)
                ck = self._pad([sts[i].k for i in alive], sts[0].k)
                cv = self._pad([sts[i].v for i in alive], sts[0].v)
                g, nk, nv = self._run(self.embed(ids), h[idx][:, None], pos, ck, cv, [len(sts[i].k) for i in alive],
                                      [1] * len(alive))
                for r, i in enumerate(alive):
                    sts[i].k, sts[i].v = torch.cat([sts[i].k, nk[r]]), torch.cat([sts[i].v, nv[r]])
                h = h.clone()
                h[idx] = g[:, 0]
            rows = self._full(nn.functional.linear(self.norm(h[torch.tensor(alive, device=dev)]), self.head_weight))
            keep = []
            for r, i in enumerate(alive):
                seq, row = live[i], rows[r : r + 1]
                if self.threshold > 0:
                    p = float(row[0].float().softmax(-1).max())
                    conf[i] = conf[i] * p if self.cumulative else p
                    if conf[i] < self.threshold:
                        continue
                params = seq.request.params
                if params.greedy:
                    tok = int(row[0].argmax())
                else:
                    q = target_probs(row, params)[0]
                    tok = int(torch.multinomial(q, 1, generator=seq.sampler.generator))
                    probs[i].append(q)
                seq.draft_ids.append(tok)
                keep.append(i)
            alive = keep
        for i, (seq, st) in enumerate(zip(live, sts)):
            st.cut_kv(committed[i])  # drafted positions are not kept
            if probs[i]:
                seq.draft_probs = torch.stack(probs[i])

    def verify(self, seq: Sequence, logits: torch.Tensor, parents: list[int] | None = None):
        return super(ChimeraProposer, self).verify(seq, logits, parents)
