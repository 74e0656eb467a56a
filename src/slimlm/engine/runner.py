"""The model runner: turns a SchedulerOutput into one forward pass over the paged KV cache.

It never decides who runs. Per step it (1) copies forked blocks, (2) builds the step's
attention metadata once — every chunk flattened into one row (prepacking: prompts of different
lengths share the row with their own positions, so no compute goes to padding), slots from
each chunk's storage indices, RoPE positions (depths for a speculative tree), the row ->
sequence map — (3) runs the model's own decoder layers with the per-layer row plans the hooks
return, and (4) returns a :class:`RunnerOutput`: logits only for the rows that need them, and
the hidden states of those rows at the layers plug-ins asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.engine.hooks import LayerHook, Segment, Stage, StepInfo, bypass_plan, combine_plans
from slimlm.engine.paged_attention import (
    AttentionPaths, DecodeGroup, DecodeTable, PagedAttention, PrefillSegment, kept_blocks,
)
from slimlm.engine.sched_output import ScheduledChunk, SchedulerOutput
from slimlm.engine.segments import set_allow_mask
from slimlm.kvcache.storage import PagedKVCache
from slimlm.model.quant.formats import release_prefill_heap
from slimlm.model.quant.linear import QuantLinear
from slimlm.model.quant.native_head import native_head
from slimlm.model.quant.native_layers import native_decode_layers
from slimlm.model.transformer import CausalLM


@dataclass
class RunnerOutput:
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    """seq_id -> (num_logits, V) for the chunks that asked for logits."""
    hidden: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    """seq_id -> {layer: (num_logits, D)}: the hidden states entering ``layer`` (``num_layers``
    = after the last layer, before the final norm) of the rows that have logits, for each
    layer in ``ModelRunner.capture``; capture ``-1``: the final hidden state of every row of the
    chunk (prefill chunks included; the layer-by-layer path without restaging hooks only)."""


def tree_positions(start: int, parents: list[int]) -> list[int]:
    """Positions of a flattened draft tree: the root (token 0) at ``start``, each node one
    past its parent. ``parents[i]`` is the index of token i's parent (-1 for the root)."""
    pos = []
    for i, p in enumerate(parents):
        pos.append(start if p < 0 else pos[p] + 1)
    return pos


def tree_mask(parents: list[int]) -> list[list[bool]]:
    """(T, T) ancestor-or-self mask of a flattened tree (parents precede children)."""
    T = len(parents)
    m = [[False] * T for _ in range(T)]
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] = list(m[p])
        m[i][i] = True
    return m


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, paths: AttentionPaths, hooks: list[LayerHook],
                 rope_ext=None):
        self.model, self.cache, self.paths, self.hooks = model, cache, paths, hooks
        self.rope_ext = rope_ext
        """A RoPE extension (``model/rope_extension.py``): its rotary and rope positions."""
        self.rotary = rope_ext.rotary().to(model.device) if rope_ext is not None else model.rotary
        self.device = model.device
        self.windows = model.windows()
        self.capture: set[int] = set()
        """Layers whose entering hidden states the step returns (for proposers and hooks)."""
        self.batch_invariant = False
        """Rows round the same whatever the step's batch (``EngineConfig.batch_invariant``)."""
        self.dense_lowp = any(isinstance(m, torch.nn.Linear) and m.weight.dtype in (torch.bfloat16, torch.float16)
                              for m in model.modules())
        """A dense bf16 / fp16 linear layer exists: only those round a single row differently
        (the packed-weight kernels compute every row alone, so a twin row would be pure cost
        there: 8 % of a gguf batch-1 step)."""
        self.native_layers = native_decode_layers(model, cache, paths, hooks, rope_ext)
        """All-decode steps of a packed or dense fp32 / bf16 model through whole layers in one native
        call (``model/quant/native_layers.py``), or None: the layer-by-layer path."""
        self.head = native_head(model) or model.head
        self.packed = any(isinstance(m, QuantLinear) for m in model.modules())
        """Packed weights: a prefill step is followed by ``release_prefill_heap`` (a memory-bound model)."""
        """``model.head``, by a native GEMV for few rows of a dense model (``model/quant/native_head.py``)."""
        self.restagers = [h for h in hooks if type(h).restage is not LayerHook.restage]
        """Hooks that change the step's rows between layers (``LayerHook.restage``)."""
        for h in hooks:
            h.bind(model)

    def _tensor(self, x) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.cache.copy_blocks(out.block_copies)
        bs = self.cache.block_size
        span = self.paths.span
        ids, pos, slots, row_seq, row_out = [], [], [], [], []
        logit_rows: list[int] = []
        prefills: list[PrefillSegment] = []
        segments: list[Segment] = []
        decodes: list[tuple[int, int, list[int], list[int]]] = []  # (row, storage index, blocks, logical)
        row = single = 0
        # tree key views' context blocks (spec/tree_rows.py), after the forks' copies they may read
        self.cache.copy_blocks([cp for c in out.chunks if c.tree_rows is not None for cp in c.tree_rows.copies])
        for c in out.chunks:
            T = len(c.token_ids)
            p = tree_positions(c.start, c.tree_parents) if c.tree_parents else list(range(c.start, c.start + T))
            ids += c.token_ids
            pos += c.layout.positions_for(c.start, T) if c.layout is not None else p
            if c.tree_rows is not None:
                slots += [c.tree_rows.slot(i) for i in range(T)]
            else:
                slots += [c.block_table[x // bs] * bs + x % bs for x in range(c.kv_start, c.kv_start + T)]
            row_seq += [c.seq_id] * T
            row_out += [x >= c.prompt_len for x in p]
            logit_rows += range(row + T - c.num_logits, row + T)
            segments.append(Segment(c.seq_id, row, row + T, not c.tree_parents and p[-1] < c.prompt_len, c.prompt_len,
                                    c.block_table))
            observed = self.paths.observe_window > 0 and c.start + 1 == c.prompt_len  # a 1-token last chunk
            if T == 1 and not (c.layout is not None and c.layout.in_set(c.start, 1)) and not observed:
                decodes.append((row, c.kv_start, *kept_blocks(c.block_table, c.kv_start + 1, bs)))
                single += 1
            elif c.tree_rows is not None:  # each node a decode row over its ancestors (spec/tree_rows.py)
                decodes += [(row + i, *c.tree_rows.decode(i)) for i in range(T)]
            elif self._verify_rows(c):  # each row attends its own prefix, as a decode step
                decodes += [(row + r, c.kv_start + r, *kept_blocks(c.block_table, c.kv_start + r + 1, bs))
                            for r in range(T)]
            else:
                prefills.append(self._segment(c, row, T))
            row += T
        for c in out.chunks:  # a tree's twin rows: ancestors computed again into a later key view
            for node, v in c.tree_rows.twins if c.tree_rows is not None else ():
                ids.append(c.token_ids[node])
                pos.append(c.start + c.tree_rows.depth[node])
                slots.append(c.tree_rows.slot(node, v))
                row_seq.append(c.seq_id)
                row_out.append(True)
                decodes.append((row, *c.tree_rows.decode(node, v)))
                row += 1
        twin = row == 1 and bool(decodes) and self._pad_lone_row()
        if twin:  # a lone decode row runs twice: the matmuls take their multi-row path
            ids, pos, slots, row_seq, row_out = ids * 2, pos * 2, slots * 2, row_seq * 2, row_out * 2
            logit_rows = [0, 1]  # the head too sees two rows; the outputs below read the first
            decodes.append((1, *decodes[0][1:]))
        positions = self._tensor([pos])  # (1, T)
        table = self._decode_table(decodes) if self.paths.native_decode is not None else None
        groups = self._decode_groups(decodes) if table is None or any(self.windows.values()) else []
        attn = PagedAttention(self.cache, self.paths, self._tensor(slots), groups, prefills, self.windows,
                              self.model.attn_scale, self.rotary, table)
        lr = self._tensor(logit_rows)
        info = StepInfo(positions[0], single, self._tensor(row_seq),
                        torch.tensor(row_out, dtype=torch.bool, device=self.device), lr, tuple(segments))
        h, hidden = self._forward(self._tensor([ids]), positions, attn, info)
        logits = self.head(h)  # (R, V)
        if prefills and self.packed:
            release_prefill_heap()  # glibc's freed heap back to the OS (model/quant/formats.py)
        res = RunnerOutput()
        every = hidden.pop(-1, None)  # capture -1: the final hidden state of every row (a full-context draft)
        r = 0
        for c, sg in zip(out.chunks, segments):
            if every is not None:
                res.hidden.setdefault(c.seq_id, {})[-1] = every[sg.start : sg.end]
            if c.num_logits:
                res.logits[c.seq_id] = logits[r : r + c.num_logits]
                if hidden:
                    res.hidden.setdefault(c.seq_id, {}).update({i: x[r : r + c.num_logits] for i, x in hidden.items()})
                r += c.num_logits
        return res

    def tree_rows_ok(self, c: ScheduledChunk) -> bool:
        """A tree chunk can be verified as decode rows over key views (``engine/spec/tree_rows.py``):
        only under ``batch_invariant``, without hooks (a twin row must compute exactly as its
        original), a prompt layout or a query policy (it keeps summaries per physical block)."""
        return self.batch_invariant and not self.hooks and c.layout is None and self.paths.sparse is None

    def _verify_rows(self, c: ScheduledChunk) -> bool:
        return self.batch_invariant and c.num_drafts > 0 and not c.tree_parents and c.layout is None

    def _pad_lone_row(self) -> bool:
        return self.batch_invariant and not self.hooks and self.dense_lowp and self.native_layers is None

    def _segment(self, c: ScheduledChunk, row: int, T: int) -> PrefillSegment:
        bs = self.cache.block_size
        q = self._tensor([list(range(c.kv_start, c.kv_start + T))])  # storage indices
        tree = torch.tensor(tree_mask(c.tree_parents), device=self.device) if c.tree_parents else None
        phys, logical = kept_blocks(c.block_table, c.kv_start + T, bs)
        all_kept = len(logical) == logical[-1] + 1
        sets = c.layout is not None and c.layout.in_set(c.start, T)  # a set-based mask (engine/segments.py)
        native = self.paths.native_prefill is not None or self.paths.sparse_prefill_native is not None \
            or self.paths.dca_native is not None
        table = self._tensor(phys) if native and all_kept and tree is None and not sets else None
        observe = self.paths.observe_window > 0 and tree is None and c.start < c.prompt_len <= c.start + T
        if c.kv_start == 0 and self.paths.span.window is None and tree is None and self.cache.lossless:
            # the chunk is its whole context: its own new keys (a lossy codec reads them back
            # through the cache, so every chunking sees the same stored keys)
            allow = set_allow_mask(c.layout, q[0], q[0]) if sets else None
            return PrefillSegment(slice(row, row + T), q, None, q, table=table, allow=allow, observe=observe)
        k_pos = self._kpos([logical])
        allow = set_allow_mask(c.layout, q[0], k_pos[0]) if sets else None
        return PrefillSegment(slice(row, row + T), q, self._tensor(phys), k_pos, table=table,
                              tree=tree, kv_start=c.kv_start, allow=allow, observe=observe)

    def _kpos(self, logical: list[list[int]]) -> torch.Tensor:
        """Key storage indices (B, nb * block_size) of padded logical block lists (-1 = padding)."""
        bs = self.cache.block_size
        lb = self._tensor(logical)[..., None]  # (B, nb, 1)
        kpos = lb * bs + torch.arange(bs, device=self.device)  # (B, nb, bs)
        return kpos.masked_fill(lb < 0, -1).flatten(1)

    def _decode_table(self, decodes) -> DecodeTable | None:
        """One padded block table for the native decode kernel, or None when there are no
        decodes or a sequence has dropped blocks (then the grouped gather path serves)."""
        if not decodes or any(len(d[3]) != d[3][-1] + 1 for d in decodes if d[3]):
            return None
        nb = max(len(d[2]) for d in decodes)
        return DecodeTable(self._tensor([d[0] for d in decodes]),
                           self._tensor([d[2] + [0] * (nb - len(d[2])) for d in decodes]),
                           self._tensor([d[1] + 1 for d in decodes]))

    def _decode_groups(self, decodes) -> list[DecodeGroup]:
        """Single-token chunks, batched by context length so padding stays small: sequences are
        sorted by kept blocks and cut into groups whose longest is at most 1.5x (+4 blocks) the
        shortest."""
        groups: list[DecodeGroup] = []
        order = sorted(decodes, key=lambda d: len(d[2]))
        i = 0
        while i < len(order):
            j, lo = i, max(len(order[i][2]), 1)
            while j < len(order) and len(order[j][2]) <= max(lo * 1.5, lo + 4):
                j += 1
            part = order[i:j]
            nb = max(len(d[2]) for d in part)
            blocks = [b for d in part for b in d[2] + [0] * (nb - len(d[2]))]
            logical = [d[3] + [-1] * (nb - len(d[3])) for d in part]
            groups.append(DecodeGroup(self._tensor([d[0] for d in part]), self._tensor([[d[1]] for d in part]),
                                      self._tensor(blocks), self._kpos(logical), nb))
            i = j
        return groups

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attn: PagedAttention, info: StepInfo):
        model, hooks = self.model, self.hooks
        if self.native_layers is not None and self.native_layers.applies(attn, ids.shape[1]):
            return self.native_layers.forward(ids, positions, attn, self.rotary, self.capture, info.logit_rows)
        if self.native_layers is not None and self.native_layers.applies_sparse(attn, ids.shape[1]):  # query policy
            return self.native_layers.forward_sparse(ids, positions, attn, self.rotary, self.capture, info.logit_rows)
        h = model.embed(ids)  # (1, T, D)
        rope_pos = self.rope_ext.rope_positions(positions) if self.rope_ext is not None else positions
        cos, sin = self.rotary(rope_pos, h.dtype)
        hidden: dict[int, torch.Tensor] = {}
        for hk in hooks:
            hk.begin_step(info)
        active = None  # rows still running (None = all)
        T = ids.shape[1]
        for i, layer in enumerate(model.model.layers):
            if i in self.capture:
                hidden[i] = h[0, info.logit_rows]
            for hk in self.restagers:
                st = hk.restage(i, Stage(h, cos, sin, attn, info, active))
                if st is not None:  # rows enter / leave with their KV (LazyLLM): appended after the step's rows
                    h, cos, sin, attn, info, active, T = st.h, st.cos, st.sin, st.attn, st.info, st.active, st.h.shape[1]
            if not T:
                continue  # every row left the step
            for hk in hooks:
                h = hk.before_layer(i, h, info)
            plan = None
            if hooks or active is not None:
                plans = [p for p in (hk.plan(i, h, info, active) for hk in hooks) if p is not None]
                plan = combine_plans(plans, active, info.logit_rows, T)
                active = plan.q_rows if plan is not None else None
                runs, plan = bypass_plan(hooks, i, info, plan, T)  # SkipDecode: rows skipping this layer only
                if not runs:
                    continue
            h = layer(h, cos, sin, attn, plan)
        if len(model.model.layers) in self.capture:
            hidden[len(model.model.layers)] = h[0, info.logit_rows]
        if -1 in self.capture and not self.restagers:
            hidden[-1] = h[0]
        return h[0, info.logit_rows], hidden  # (R, D): the rows whose logits the step needs

