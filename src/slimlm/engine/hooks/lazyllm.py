"""LazyLLM: dynamic token pruning in prefill, with an auxiliary cache (Fu et al., 2024).

Not every prompt token matters for the first output token. At chosen layers LazyLLM ranks the
prompt's tokens by the attention the prompt's *last* token (the question) gives them at that
layer and lets only the top fraction continue to the deeper layers, progressively (fewer at
each pruning layer): time to first token drops because the deeper layers process fewer rows.
A pruned token has no KV at the layers it skipped; its hidden state at the layer where it left
goes to the auxiliary cache, from which it is later revived: its missing layers are computed
from that state, as extra rows of a later step, so no layer of a token is ever computed twice.

Which tokens continue (``window``, ``heads``, ``pool``, ``sinks``): the paper's rule is the last
token's attention, mean over heads (``window=1, heads="mean", pool=1``). On SmolLM2-135M that
rule does not single out what the answer needs (a passkey) at a third of the depth. The default
variant scores with the attention of the prompt's last ``window`` tokens (SnapKV's observation
window: the whole question, not only its last token; those tokens always continue), takes the
max over heads (a token one retrieval head reads survives), max-pools the scores over ``pool``
neighbours (a kept token keeps its phrase) and may keep the first ``sinks`` tokens; it prunes
later (half the depth) and harder. Nothing in it knows the task. Measured choice of the
defaults: docs/techniques.md, "LazyLLM".

In the engine (``restage``, the layer-plan seam that adds and removes rows with their KV):

- **Several chunks.** A prompt longer than the step's budget arrives in chunks. The selection
  needs the last token, so the chunks before the final one run only the layers below the first
  pruning layer ``l0`` (they write KV there) and leave; their hidden states entering ``l0`` wait
  in the auxiliary cache. When the final chunk arrives, its rows run the layers below ``l0``,
  then the earlier chunks' rows join the step at ``l0`` and the whole prompt is pruned there by
  its window's attention, then at each later pruning layer. The deep layers of a long prompt
  thus run in its final step (that step may hold more rows than the token budget); the result
  does not depend on where the chunks were cut.
- **Masked, not stale.** At a pruning layer ``l`` the window's attention is computed over the
  tokens still running (softmax over them: the layer's own attention map), the lowest-scored
  leave. They write no KV at ``l`` and above: the backend of the layers
  above writes only the running rows, and the kept rows' attention there sees only kept keys.
- **Revival** (``revive="first"``, the default and the only mode): every pruned token re-enters
  at its pruning layer from its saved hidden state in the sequence's next step (the first decode
  step) and computes its missing layers, attending to every earlier token; from then on the
  sequence's KV is complete, so decoding reads it with the ordinary (native) kernels and
  pruning changes only the first token. Why this default: it bounds the quality loss to the
  first token (plus the kept tokens' deep KV, which was computed without the pruned ones, as in
  the paper), while time to first token keeps the whole saving. The paper's per-step re-selection
  (reviving only tokens a later step's attention picks) would keep pruned tokens masked through
  decoding, which the native decode kernel cannot read; it is not built.
- **Recompute.** After preemption the sequence is recomputed from its first token; a chunk that
  holds the prompt's last token and generated tokens revives its pruned rows in the same step
  (they continue as "revived" rows, which see every earlier key, while the kept rows still see
  only kept keys), giving the same KV as pruning + revival in two steps.

Prompts shorter than ``min_tokens`` and requests that want prompt logprobs (every row needs its
logits) are not pruned. A forked sample (n > 1) revives its own copy of the prompt's pruned rows.
Lossy; off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from slimlm.engine.hooks.base import LAYER_HOOKS, LayerHook, Segment, Stage, StepInfo
from slimlm.engine.paged_attention import DecodeGroup, DecodeTable, PagedAttention, PrefillSegment, kept_blocks
from slimlm.model.rope import apply_rope
from slimlm.model.transformer import CausalLM


@dataclass
class _Aux:
    """A sequence's auxiliary cache: hidden states of rows waiting to (re)enter the layers."""

    prompt_len: int
    deferred: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(positions (n,), hidden entering the first pruning layer (n, D)) of earlier chunks."""
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """layer -> (positions, hidden entering that layer) of tokens pruned there, to revive."""


@dataclass
class _Role:
    kind: str  # "defer" | "final" | "revive"
    seg: Segment
    in_step: bool = False
    """final chunk that also holds generated tokens (a recompute): revive in this step."""


@LAYER_HOOKS.register("lazyllm")
@dataclass
class LazyLLM(LayerHook):
    prefix_exact = False
    with_kv_policy = False

    layers: list[float] = field(default_factory=lambda: [1 / 2, 2 / 3])
    """Pruning layers, as fractions of the depth (floats in (0, 1)) or layer indices (ints). The
    paper's example prunes from a third of the depth; on SmolLM2-135M the window's attention
    singles out what the answer needs only from about half the depth, so the defaults prune later
    and harder (docs/techniques.md, "LazyLLM")."""
    keep: list[float] = field(default_factory=lambda: [0.3, 0.1])
    """Fraction of the prompt's tokens still running after each pruning layer (non-increasing)."""
    min_tokens: int = 64
    """Prompts shorter than this are not pruned."""
    revive: str = "first"
    """When pruned tokens get their missing layers: "first" = in the sequence's next step."""
    window: int = 8
    """Observation window: the prompt's last ``window`` tokens score the others (their attention
    averaged over the window) and always continue. 1 = the paper's rule (the last token alone);
    more is SnapKV's observation window (Li et al., 2024), which reads the whole question."""
    heads: str = "max"
    """How the query heads' attention becomes one score per token: "mean" (the paper) or "max"
    (a token one head relies on is kept even if the other heads ignore it)."""
    pool: int = 7
    """Max-pool the scores over this many neighbouring running tokens (odd; 1 = off): a kept
    token keeps its neighbours, so a phrase survives whole (SnapKV's clustering)."""
    sinks: int = 0
    """The prompt's first ``sinks`` tokens always continue (attention sinks, Xiao et al., 2023)."""

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.keep) or not self.layers:
            raise ValueError(f"lazyllm needs one keep ratio per pruning layer, got layers={self.layers}, "
                             f"keep={self.keep}")
        if any(not 0.0 < k <= 1.0 for k in self.keep) or any(a < b for a, b in zip(self.keep, self.keep[1:])):
            raise ValueError(f"lazyllm keep ratios must be in (0, 1] and non-increasing, got {self.keep}")
        if self.revive != "first":
            raise ValueError(f"lazyllm revive must be 'first', got {self.revive!r}")
        if self.heads not in ("mean", "max"):
            raise ValueError(f"lazyllm heads must be 'mean' or 'max', got {self.heads!r}")
        for name in ("window", "pool"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"lazyllm {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.pool % 2 == 0:
            raise ValueError(f"lazyllm pool must be odd, got {self.pool}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"lazyllm sinks must be an integer >= 0, got {self.sinks!r}")
        self._at: dict[int, float] = {}
        self._l0 = 0
        self.model: CausalLM | None = None
        self._aux: dict[int, _Aux] = {}
        self._roles: dict[int, _Role] = {}
        # per step, in the step's current row order (rows are appended and dropped at restages):
        self._base: PagedAttention | None = None  # the runner's backend for the step
        self._ord: tuple | None = None  # its decode table, groups and prefill segments for untouched rows
        self._lazy = self._slots = None  # (T,) rows served by LazyLLM's segments; (T,) their KV slots
        self._epoch1: torch.Tensor | None = None  # (T,) rows that see every earlier key (revived, generated)

    def bind(self, model: CausalLM) -> None:
        self._at = self.pruning_layers(model.cfg.num_layers)
        self._l0, self.model = min(self._at), model

    def pruning_layers(self, n: int) -> dict[int, float]:
        """Layer index -> keep ratio for a model of ``n`` layers."""
        at = {}
        for x, k in zip(self.layers, self.keep):
            i = int(x) if isinstance(x, int) else int(round(x * n))
            if not 0 < i < n:
                raise ValueError(f"lazyllm pruning layer {x} is outside the model's layers 1..{n - 1}")
            if at and i < max(at):
                raise ValueError(f"lazyllm pruning layers must ascend, got {self.layers}")
            at[i] = k  # fractions that round to one layer of a shallow model: the later (smaller) keep
        return at

    def prefill_work(self, cfg, P: int) -> dict[str, float]:
        """Deterministic work of one ``P``-token prefill with this pruning vs full prefill: the
        linear layers' FLOPs (rows x layers), attention FLOPs (causal query-key pairs: kept rows
        attend only to kept keys) and scoring FLOPs, and ``share``, pruned / full in all. TTFT
        cannot drop below ``share`` of full prefill's (the revived rows' cost moves to the next
        step). Gated MLP, no MoE."""
        D, d, L = cfg.hidden_size, cfg.head_dim or cfg.hidden_size // cfg.num_heads, cfg.num_layers
        hq, hkv = cfg.num_heads * d, cfg.num_kv_heads * d
        lin = 2 * (2 * D * hq + 2 * D * hkv + 3 * D * cfg.intermediate_size)  # per row and layer
        pair = 4 * hq  # q.k and p.v per (query, key) pair and layer
        at = self.pruning_layers(L) if P >= self.min_tokens else {}
        forced = min(P, self.window + self.sinks)
        n, rows, att, score = P, 0, 0.0, 0.0
        for i in range(L):
            if i in at:
                w = min(self.window, n)
                score += 2 * D * hkv * n + 2 * D * hq * w + pair * w * n  # keys, window queries, window attention
                n = min(n, max(forced, max(1, int(P * at[i]))))
            rows += n
            att += n * (n + 1) / 2
        full = L * (P * lin + P * (P + 1) / 2 * pair)
        return {"linear": rows / (L * P), "attention": att / (L * P * (P + 1) / 2),
                "share": (rows * lin + att * pair + score) / full}

    def release(self, seq_id: int) -> None:
        self._aux.pop(seq_id, None)

    def fork(self, parent: int, child: int) -> None:
        aux = self._aux.get(parent)
        if aux is not None:
            self._aux[child] = _Aux(aux.prompt_len, [], dict(aux.pending))

    # ------------------------------------------------------------------ step
    def begin_step(self, info: StepInfo) -> None:
        self._roles, self._base, self._ord, self._epoch1 = {}, None, None, None
        pos = info.positions
        lr = set(info.logit_rows.tolist()) if info.logit_rows is not None else set()
        for seg in info.segments:
            P = seg.prompt_len
            first, last = int(pos[seg.start]), int(pos[seg.end - 1])
            if first == 0:  # a new prompt, or a recompute after preemption
                self._aux.pop(seg.seq_id, None)
                early_logits = any(int(pos[r]) < P - 1 for r in lr if seg.start <= r < seg.end)
                if P >= self.min_tokens and seg.block_table is not None and not early_logits:
                    self._aux[seg.seq_id] = _Aux(P)
            aux = self._aux.get(seg.seq_id)
            if aux is None:
                continue
            if first <= P - 1 <= last:
                self._roles[seg.seq_id] = _Role("final", seg, in_step=last >= P)
            elif last < P - 1:
                self._roles[seg.seq_id] = _Role("defer", seg)
            elif aux.pending:
                self._roles[seg.seq_id] = _Role("revive", seg)

    def restage(self, layer: int, stage: Stage) -> Stage | None:
        """At a pruning layer: earlier chunks' rows leave (first pruning layer) or join the final
        chunk, pending revivals enter, the final chunks' prompts are pruned; then the rows that
        left are dropped from the step (they compute nothing above) and the attention backend
        for the layers up to the next pruning layer is built."""
        if layer not in self._at or not self._roles:
            return None
        info, h = stage.info, stage.h
        dev, T = h.device, h.shape[1]
        if self._ord is None:  # the step's first restage (at the first pruning layer): original rows
            lazy = torch.zeros(T, dtype=torch.bool, device=dev)
            for role in self._roles.values():
                if role.kind in ("final", "defer"):
                    lazy[role.seg.start : role.seg.end] = True
            ordinary = (~lazy).nonzero()[:, 0]
            self._ord = stage.attn._restrict(ordinary) if ordinary.numel() else (None, [], [])
            self._base, self._lazy, self._slots = stage.attn, lazy, stage.attn.slots
            self._epoch1 = torch.zeros(T, dtype=torch.bool, device=dev)
        present = torch.ones(T, dtype=torch.bool, device=dev)
        if stage.active is not None:
            present.zero_()
            present[stage.active] = True
        new_pos, new_h, new_seq, new_slots = [], [], [], []
        bs = stage.attn.cache.block_size
        for sid, role in self._roles.items():
            aux = self._aux[sid]
            if role.kind == "defer" and layer == self._l0:  # rows are still the runner's here
                rows = torch.arange(role.seg.start, role.seg.end, device=dev)
                present[rows] = False
                aux.deferred.append((info.positions[rows], h[0, rows]))
            elif role.kind == "final" and layer == self._l0 and aux.deferred:
                new_pos += [p for p, _ in aux.deferred]
                new_h += [x for _, x in aux.deferred]
                new_seq.append((sid, sum(p.numel() for p, _ in aux.deferred)))
                new_slots += [_slots(role.seg.block_table, p, bs) for p, _ in aux.deferred]
                aux.deferred = []
            elif role.kind == "revive" and layer in aux.pending:
                p, x = aux.pending.pop(layer)
                new_pos.append(p)
                new_h.append(x)
                new_seq.append((sid, p.numel()))
                new_slots.append(_slots(role.seg.block_table, p, bs))
        cos, sin = stage.cos, stage.sin
        if new_pos:  # rows entering here, appended after the step's rows
            pos = torch.cat(new_pos)
            n = pos.numel()
            c, s = self.model.rotary(pos[None], h.dtype)
            h = torch.cat([h, torch.cat(new_h)[None].to(h.dtype)], 1)
            cos, sin = torch.cat([cos, c], 1), torch.cat([sin, s], 1)
            seq = torch.cat([torch.full((k,), sid, dtype=torch.long, device=dev) for sid, k in new_seq])
            revive = torch.cat([torch.full((k,), self._roles[sid].kind == "revive", device=dev) for sid, k in new_seq])
            info = replace(info, positions=torch.cat([info.positions, pos]), row_seq=torch.cat([info.row_seq, seq]),
                           row_output=torch.cat([info.row_output, torch.zeros(n, dtype=torch.bool, device=dev)]))
            self._slots = torch.cat([self._slots, *(x.to(self._slots.dtype) for x in new_slots)])
            present = torch.cat([present, torch.ones(n, dtype=torch.bool, device=dev)])
            self._epoch1 = torch.cat([self._epoch1, revive])
            self._lazy = torch.cat([self._lazy, torch.ones(n, dtype=torch.bool, device=dev)])
        epoch1 = self._epoch1
        ratio = self._at[layer]
        for sid, role in self._roles.items():  # prune each final chunk's prompt by its last token
            if role.kind != "final":
                continue
            P = role.seg.prompt_len
            if role.in_step:  # its generated rows see every key
                epoch1 |= (info.row_seq == sid) & (info.positions >= P)
            rows = ((info.row_seq == sid) & present & ~epoch1 & (info.positions < P)).nonzero()[:, 0]
            target = max(1, int(P * ratio))
            if rows.numel() <= target:
                continue
            drop = self._select(layer, h, rows, info.positions, P, target)
            if role.in_step:  # a recompute holding generated tokens: the pruned rows revive now
                epoch1[drop] = True
            else:
                present[drop] = False
                self._aux[sid].pending[layer] = (info.positions[drop], h[0, drop])
        if not bool(present.all()):
            h, cos, sin, info = self._compact(present, h, cos, sin, info)
        return Stage(h, cos, sin, self._attention(info), info, None)

    def _compact(self, keep: torch.Tensor, h, cos, sin, info: StepInfo):
        """Drop the rows that left (their aux state is saved): every index moves to ``keep``'s."""
        idx = keep.nonzero()[:, 0]
        remap = torch.full((keep.numel(),), -1, dtype=torch.long, device=keep.device)
        remap[idx] = torch.arange(idx.numel(), device=keep.device)
        self._epoch1, self._lazy, self._slots = self._epoch1[idx], self._lazy[idx], self._slots[idx]
        table, groups, prefills = self._ord
        if table is not None:
            table = DecodeTable(remap[table.rows], table.table, table.lens)
        groups = [DecodeGroup(remap[g.rows], g.q_pos, g.blocks, g.k_pos, g.nb) for g in groups]
        prefills = [replace(p, rows=_moved(p.rows, remap), key_rows=_moved(p.key_rows, remap)) for p in prefills]
        self._ord = (table, groups, prefills)
        segs = tuple(replace(sg, start=int(remap[sg.start]), end=int(remap[sg.start]) + sg.end - sg.start)
                     for sg in info.segments if sg.end <= keep.numel() and bool(keep[sg.start : sg.end].all()))
        info = replace(info, positions=info.positions[idx], row_seq=info.row_seq[idx], row_output=info.row_output[idx],
                       logit_rows=remap[info.logit_rows], num_decode_rows=int(keep[: info.num_decode_rows].sum()),
                       segments=segs)
        return h[:, idx], cos[:, idx], sin[:, idx], info

    # ------------------------------------------------------------------ attention above a pruning layer
    def _attention(self, info: StepInfo) -> PagedAttention:
        """The backend for the layers from here to the next pruning layer: the runner's own
        metadata for the rows LazyLLM does not touch, one segment per final chunk (its running
        prompt rows attend each other's new keys: exactly the kept keys) and per revival (its
        rows read every earlier token from the cache, written before any read at each layer)."""
        base = self._base
        cache, bs, dev = base.cache, base.cache.block_size, self._slots.device
        table, groups, prefills = self._ord
        prefills = list(prefills)
        for sid, role in self._roles.items():
            if role.kind == "defer":
                continue
            rows = ((info.row_seq == sid) & self._lazy).nonzero()[:, 0]
            if not rows.numel():
                continue
            rows = rows[info.positions[rows].argsort()]
            q_pos = info.positions[rows][None]  # (1, n) storage indices = positions (no compaction)
            if role.kind == "final":
                allow = None
                e = self._epoch1[rows]
                if bool(e.any()):  # kept rows see kept keys only; revived / generated rows see all
                    allow = e[:, None] | ~e[None, :]
                prefills.append(PrefillSegment(rows, q_pos, None, q_pos, allow=allow))
            else:
                phys, logical = kept_blocks(role.seg.block_table, int(q_pos.max()) + 1, bs)
                lb = torch.tensor(logical, device=dev)[:, None]
                k_pos = (lb * bs + torch.arange(bs, device=dev)).flatten()[None]
                prefills.append(PrefillSegment(rows, q_pos, torch.tensor(phys, device=dev), k_pos))
        return PagedAttention(cache, base.paths, self._slots, groups, prefills, base.windows, base.scale, base.rotary,
                              table)

    def _select(self, layer: int, h: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, P: int,
                target: int) -> torch.Tensor:
        """The rows of ``rows`` (one prompt's running rows) that leave at ``layer``, sorted: all
        but the ``target`` best scored; the observation window and the sinks always continue."""
        pos = positions[rows]
        rows, pos = rows[pos.argsort()], pos.sort().values  # position order (deferred rows come last)
        score = self._importance(layer, h, rows, pos, P)
        forced = (pos >= P - self.window) | (pos < self.sinks)
        score[forced] = float("inf")
        n = min(rows.numel() - target, int((~forced).sum()))
        return rows[score.argsort(stable=True)[: max(n, 0)]].sort().values  # ties (pooling): earlier leaves

    def _importance(self, layer: int, h: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, P: int) -> torch.Tensor:
        """Score of each of ``rows`` (at ascending positions ``pos``) at ``layer``: the attention the
        window's rows (positions >= P - window) give it, softmax over ``rows`` (causal), mean over
        the window, then mean or max over heads, then max-pooled over ``pool`` neighbours: (n,)."""
        blk = self.model.model.layers[layer]
        att, cfg = blk.self_attn, self.model.cfg
        d = cfg.head_dim
        win = (pos >= P - self.window).nonzero()[:, 0]  # (w,) indices into rows
        x = blk.input_layernorm(h[0, rows])  # (n, D)
        cos, sin = self.model.rotary(pos[None], h.dtype)  # (1, n, d)
        k = apply_rope(att.k_proj(x).view(1, -1, cfg.num_kv_heads, d).transpose(1, 2), cos, sin)  # (1, Hkv, n, d)
        q = att.q_proj(x[win]).view(1, -1, cfg.num_heads, d).transpose(1, 2)  # (1, Hq, w, d)
        q = apply_rope(q, cos[:, win], sin[:, win])
        k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 1)  # (1, Hq, n, d)
        s = (q @ k.transpose(-1, -2)).float() * self.model.attn_scale  # (1, Hq, w, n)
        s = s.masked_fill(pos[None, :] > pos[win][:, None], float("-inf"))  # causal within the window
        p = s.softmax(-1)[0].mean(1)  # (Hq, n): mean over the window's queries
        score = p.mean(0) if self.heads == "mean" else p.amax(0)  # (n,)
        if self.pool > 1:
            score = torch.nn.functional.max_pool1d(score[None, None], self.pool, 1, self.pool // 2)[0, 0]
        return score


def _moved(rows, remap: torch.Tensor):
    """Step rows after a compaction: a contiguous (kept) run stays a slice."""
    if rows is None:
        return None
    if isinstance(rows, slice):
        start = int(remap[rows.start])
        return slice(start, start + rows.stop - rows.start)
    return remap[rows]


def _slots(table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV slots of a sequence's tokens at ``positions`` (storage index = position)."""
    tb = torch.tensor(table, device=positions.device)
    return tb[positions // block_size] * block_size + positions % block_size
