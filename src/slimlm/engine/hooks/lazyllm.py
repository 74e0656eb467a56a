"""LazyLLM: dynamic token pruning in prefill, with an auxiliary cache (Fu et al., 2024).

Not every prompt token matters for the first output token. At chosen layers LazyLLM ranks the
prompt's tokens by the attention the prompt's *last* token (the question) gives them at that
layer and lets only the top fraction continue to the deeper layers, progressively (fewer at
each pruning layer): time to first token drops because the deeper layers process fewer rows.
A pruned token has no KV at the layers it skipped; its hidden state at the layer where it left
goes to the auxiliary cache, from which it is later revived: its missing layers are computed
from that state, as extra rows of a later step, so no layer of a token is ever computed twice.

In the engine (``restage``, the layer-plan seam that adds and removes rows with their KV):

- **Several chunks.** A prompt longer than the step's budget arrives in chunks. The selection
  needs the last token, so the chunks before the final one run only the layers below the first
  pruning layer ``l0`` (they write KV there) and leave; their hidden states entering ``l0`` wait
  in the auxiliary cache. When the final chunk arrives, its rows run the layers below ``l0``,
  then the earlier chunks' rows join the step at ``l0`` and the whole prompt is pruned there by
  the last token's attention, then at each later pruning layer. The deep layers of a long prompt
  thus run in its final step (that step may hold more rows than the token budget); the result
  does not depend on where the chunks were cut.
- **Masked, not stale.** At a pruning layer ``l`` the attention of the last token is computed over
  the tokens still running (softmax over them, mean over heads: the layer's own attention
  map), the lowest-scored leave. They write no KV at ``l`` and above: the backend of the layers
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
from slimlm.engine.paged_attention import PagedAttention, PrefillSegment, kept_blocks
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

    layers: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])
    """Pruning layers, as fractions of the depth (floats in (0, 1)) or layer indices (ints)."""
    keep: list[float] = field(default_factory=lambda: [0.5, 0.25])
    """Fraction of the prompt's tokens still running after each pruning layer (non-increasing)."""
    min_tokens: int = 64
    """Prompts shorter than this are not pruned."""
    revive: str = "first"
    """When pruned tokens get their missing layers: "first" = in the sequence's next step."""

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.keep) or not self.layers:
            raise ValueError(f"lazyllm needs one keep ratio per pruning layer, got layers={self.layers}, "
                             f"keep={self.keep}")
        if any(not 0.0 < k <= 1.0 for k in self.keep) or any(a < b for a, b in zip(self.keep, self.keep[1:])):
            raise ValueError(f"lazyllm keep ratios must be in (0, 1] and non-increasing, got {self.keep}")
        if self.revive != "first":
            raise ValueError(f"lazyllm revive must be 'first', got {self.revive!r}")
        self._at: dict[int, float] = {}
        self._l0 = 0
        self.model: CausalLM | None = None
        self._aux: dict[int, _Aux] = {}
        self._roles: dict[int, _Role] = {}
        self._base: PagedAttention | None = None
        self._T0 = 0
        self._epoch1: torch.Tensor | None = None  # (T,) rows that see every earlier key (revived, generated)

    def bind(self, model: CausalLM) -> None:
        n = model.cfg.num_layers
        at = {}
        for x, k in zip(self.layers, self.keep):
            i = int(x) if isinstance(x, int) else int(round(x * n))
            if not 0 < i < n:
                raise ValueError(f"lazyllm pruning layer {x} is outside the model's layers 1..{n - 1}")
            if at and i < max(at):
                raise ValueError(f"lazyllm pruning layers must ascend, got {self.layers}")
            at[i] = k  # fractions that round to one layer of a shallow model: the later (smaller) keep
        self._at, self._l0, self.model = at, min(at), model

    def release(self, seq_id: int) -> None:
        self._aux.pop(seq_id, None)

    def fork(self, parent: int, child: int) -> None:
        aux = self._aux.get(parent)
        if aux is not None:
            self._aux[child] = _Aux(aux.prompt_len, [], dict(aux.pending))

    # ------------------------------------------------------------------ step
    def begin_step(self, info: StepInfo) -> None:
        self._roles, self._base, self._epoch1 = {}, None, None
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
        if layer not in self._at or not self._roles:
            return None
        if self._base is None:
            self._base, self._T0 = stage.attn, stage.h.shape[1]
        info, h = stage.info, stage.h
        dev = h.device
        T = h.shape[1]
        present = torch.ones(T, dtype=torch.bool, device=dev)
        if stage.active is not None:
            present.zero_()
            present[stage.active] = True
        epoch1 = torch.zeros(T, dtype=torch.bool, device=dev) if self._epoch1 is None else self._epoch1
        # rows that enter here: earlier chunks' rows (final chunk, first pruning layer), revivals
        new_pos, new_h, new_seq = [], [], []
        for sid, role in self._roles.items():
            aux = self._aux[sid]
            seg_rows = torch.arange(role.seg.start, role.seg.end, device=dev)
            if role.kind == "defer" and layer == self._l0:
                present[seg_rows] = False
                aux.deferred.append((info.positions[seg_rows], h[0, seg_rows]))
            elif role.kind == "final" and layer == self._l0 and aux.deferred:
                new_pos += [p for p, _ in aux.deferred]
                new_h += [x for _, x in aux.deferred]
                new_seq.append((sid, sum(p.numel() for p, _ in aux.deferred)))
                aux.deferred = []
            elif role.kind == "revive" and layer in aux.pending:
                p, x = aux.pending.pop(layer)
                new_pos.append(p)
                new_h.append(x)
                new_seq.append((sid, p.numel()))
        cos, sin = stage.cos, stage.sin
        if new_pos:
            pos = torch.cat(new_pos)
            n = pos.numel()
            c, s = self.model.rotary(pos[None], h.dtype)
            h = torch.cat([h, torch.cat(new_h)[None].to(h.dtype)], 1)
            cos, sin = torch.cat([cos, c], 1), torch.cat([sin, s], 1)
            seq = torch.cat([torch.full((k,), sid, dtype=torch.long, device=dev) for sid, k in new_seq])
            out = torch.zeros(n, dtype=torch.bool, device=dev)  # they are prompt tokens
            info = replace(info, positions=torch.cat([info.positions, pos]), row_seq=torch.cat([info.row_seq, seq]),
                           row_output=torch.cat([info.row_output, out]))
            present = torch.cat([present, torch.ones(n, dtype=torch.bool, device=dev)])
            epoch1 = torch.cat([epoch1, torch.tensor([self._roles[sid].kind == "revive" for sid, k in new_seq
                                                      for _ in range(k)], dtype=torch.bool, device=dev)])
        # prune the final chunks' prompts by their last token's attention
        ratio = self._at[layer]
        for sid, role in self._roles.items():
            if role.kind != "final":
                continue
            P = role.seg.prompt_len
            mine = (info.row_seq == sid) & present & ~epoch1 & (info.positions < P)
            rows = mine.nonzero()[:, 0]
            target = max(1, int(P * ratio))
            if rows.numel() <= target:
                continue
            probe = rows[info.positions[rows] == P - 1]
            score = self._importance(layer, h, rows, int(probe[0]), info.positions)
            score[rows == probe[0]] = float("inf")  # the last token always continues
            drop = rows[score.topk(rows.numel() - target, largest=False).indices].sort().values
            if role.in_step:  # a recompute holding generated tokens: the pruned rows revive now
                epoch1[drop] = True
            else:
                present[drop] = False
                self._aux[sid].pending[layer] = (info.positions[drop], h[0, drop])
        # the final chunks' prompts hold generated rows in a recompute: they see every key
        for sid, role in self._roles.items():
            if role.kind == "final" and role.in_step:
                epoch1 |= (info.row_seq == sid) & (info.positions >= role.seg.prompt_len)
        self._epoch1 = epoch1
        attn = self._attention(info, present, epoch1)
        active = None if bool(present.all()) else present.nonzero()[:, 0]
        return Stage(h, cos, sin, attn, info, active)

    # ------------------------------------------------------------------ attention above a pruning layer
    def _attention(self, info: StepInfo, present: torch.Tensor, epoch1: torch.Tensor) -> PagedAttention:
        """The backend for the layers from here to the next pruning layer: the runner's own
        metadata for the rows LazyLLM does not touch, one segment per final chunk (its running
        prompt rows attend each other's new keys: exactly the kept keys) and per revival (its
        rows read every earlier token from the cache, written before any read at each layer)."""
        base, T0 = self._base, self._T0
        cache, bs, dev = base.cache, base.cache.block_size, present.device
        T = present.numel()
        lazy = torch.zeros(T0, dtype=torch.bool, device=dev)
        for role in self._roles.values():
            if role.kind in ("final", "defer"):
                lazy[role.seg.start : role.seg.end] = True
        ordinary = (~lazy).nonzero()[:, 0]
        if ordinary.numel():
            table, groups, prefills = base._restrict(ordinary)
        else:
            table, groups, prefills = None, [], []
        prefills = list(prefills)
        slots = base.slots
        if T > T0:  # the entering rows' slots
            extra = []
            for r in range(T0, T):
                tb = self._roles[int(info.row_seq[r])].seg.block_table
                p = int(info.positions[r])
                extra.append(tb[p // bs] * bs + p % bs)
            slots = torch.cat([slots, torch.tensor(extra, dtype=slots.dtype, device=dev)])
        for sid, role in self._roles.items():
            if role.kind == "defer":
                continue
            rows = ((info.row_seq == sid) & present).nonzero()[:, 0]
            if role.kind == "revive":
                rows = rows[rows >= T0]  # its own chunk's rows stay on the ordinary path
            if not rows.numel():
                continue
            rows = rows[info.positions[rows].argsort()]
            q_pos = info.positions[rows][None]  # (1, n) storage indices = positions (no compaction)
            if role.kind == "final":
                allow = None
                e = epoch1[rows]
                if bool(e.any()):  # kept rows see kept keys only; revived / generated rows see all
                    allow = e[:, None] | ~e[None, :]
                prefills.append(PrefillSegment(rows, q_pos, None, q_pos, allow=allow))
            else:
                phys, logical = kept_blocks(role.seg.block_table, int(q_pos.max()) + 1, bs)
                lb = torch.tensor(logical, device=dev)[:, None]
                k_pos = (lb * bs + torch.arange(bs, device=dev)).flatten()[None]
                prefills.append(PrefillSegment(rows, q_pos, torch.tensor(phys, device=dev), k_pos))
        attn = PagedAttention(cache, base.paths, slots, groups, prefills, base.windows, base.scale, base.rotary, table)
        attn.write_rows = None if bool(present.all()) else present.nonzero()[:, 0]
        return attn

    def _importance(self, layer: int, h: torch.Tensor, rows: torch.Tensor, probe: int,
                    positions: torch.Tensor) -> torch.Tensor:
        """Attention of the probe row over ``rows`` at ``layer``, mean over heads: (n,)."""
        blk = self.model.model.layers[layer]
        att, cfg = blk.self_attn, self.model.cfg
        d = cfg.head_dim
        x = blk.input_layernorm(h[0, rows])  # (n, D)
        xp = blk.input_layernorm(h[0, probe : probe + 1])  # (1, D)
        cos, sin = self.model.rotary(positions[rows][None], h.dtype)
        cp, sp = self.model.rotary(positions[probe : probe + 1][None], h.dtype)
        k = apply_rope(att.k_proj(x).view(1, -1, cfg.num_kv_heads, d).transpose(1, 2), cos, sin)  # (1, Hkv, n, d)
        q = apply_rope(att.q_proj(xp).view(1, 1, cfg.num_heads, d).transpose(1, 2), cp, sp)  # (1, Hq, 1, d)
        k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 1)
        p = ((q @ k.transpose(-1, -2)).float() * self.model.attn_scale).softmax(-1)  # (1, Hq, 1, n)
        return p[0, :, 0].mean(0)
