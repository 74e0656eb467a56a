"""The model runner: turns a SchedulerOutput into one forward pass over the paged KV cache.

It never decides who runs. Per step it (1) copies forked blocks, (2) flattens all chunks into
one row — prepacking: prompts of different lengths share the row with their own positions, so
no compute goes to padding — (3) runs the layers with the step's :class:`PagedAttention` and
the registered hooks, and (4) returns logits only for the rows that need them.
"""

from __future__ import annotations

import torch

from slimlm.engine.hooks import LayerHook, StepInfo
from slimlm.engine.paged_attention import (
    NATIVE_DTYPES, DecodeGroup, DecodeTable, PagedAttention, PagedKVCache, PrefillSegment, kept_blocks,
)
from slimlm.engine.sched_output import SchedulerOutput
from slimlm.kvcache.policy.base import AttentionSpan
from slimlm.model.transformer import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, span: AttentionSpan, hooks: list[LayerHook],
                 native_kernels: bool = True):
        self.model, self.cache, self.span, self.hooks = model, cache, span, hooks
        self.device = model.device
        self.windows = model.windows()
        self.native = self.native_prefill = None
        if native_kernels and self.device.type == "cpu" and cache.k[0].dtype in NATIVE_DTYPES and span == AttentionSpan():
            from slimlm import kernels

            self.native = kernels.load("paged_decode")
            lib = kernels.load("paged_prefill")
            if lib is not None and lib.slimlm_prefill_supported(model.cfg.head_dim, NATIVE_DTYPES[cache.k[0].dtype]):
                self.native_prefill = lib

    def _tensor(self, x) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[int, torch.Tensor]:
        """Returns {seq_id: logits (num_logits, V)} for chunks that asked for logits."""
        self.cache.copy_blocks(out.block_copies)
        bs = self.cache.block_size
        ids, pos, slots = [], [], []
        logit_rows: list[int] = []
        prefills: list[PrefillSegment] = []
        decodes: list[tuple[int, int, list[int], list[int]]] = []  # (row, position, blocks, logical)
        row = 0
        for c in out.chunks:
            T = len(c.token_ids)
            p = list(range(c.start, c.start + T))
            ids += c.token_ids
            pos += p
            slots += [c.block_table[x // bs] * bs + x % bs for x in p]
            logit_rows += range(row + T - c.num_logits, row + T)
            if T == 1:
                decodes.append((row, c.start, *kept_blocks(c.block_table, c.start + 1, bs)))
                row += T
                continue
            phys, logical = kept_blocks(c.block_table, c.start + T, bs)
            table = self._tensor(phys) if self.native_prefill is not None and len(logical) == logical[-1] + 1 else None
            if c.start == 0 and self.span.window is None:  # the chunk is its whole context
                seg = PrefillSegment(slice(row, row + T), self._tensor([p]), None, self._tensor([p]), table=table)
            else:
                seg = PrefillSegment(slice(row, row + T), self._tensor([p]), self._tensor(phys),
                                     self._kpos([logical]), table=table)
            prefills.append(seg)
            row += T
        positions = self._tensor([pos])  # (1, T)
        table = self._decode_table(decodes) if self.native is not None else None
        groups = self._decode_groups(decodes) if table is None or any(self.windows.values()) else []
        attn = PagedAttention(self.cache, self._tensor(slots), groups, prefills, self.span, self.windows,
                              self.model.attn_scale, self.model.rotary, table, self.native, self.native_prefill)
        h = self._forward(self._tensor([ids]), positions, attn, StepInfo(positions[0], len(decodes)))
        logits = self.model.head(h[0, logit_rows])  # (R, V)
        res, r = {}, 0
        for c in out.chunks:
            if c.num_logits:
                res[c.seq_id] = logits[r : r + c.num_logits]
                r += c.num_logits
        return res

    def _kpos(self, logical: list[list[int]]) -> torch.Tensor:
        """Key positions (B, nb * block_size) of padded logical block lists (-1 = padding)."""
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
        model = self.model
        h = model.embed(ids)  # (1, T, D)
        cos, sin = model.rotary(positions, h.dtype)
        hooks = self.hooks
        for h_ in hooks:
            h_.begin_step(info)
        for i, layer in enumerate(model.model.layers):
            for hk in hooks:
                h = hk.before_layer(i, h, info)
            h = layer.attn_block(h, cos, sin, attn)
            skip = None
            for hk in hooks:
                rows = hk.skip_mlp_rows(i, info)
                if rows is not None:
                    skip = rows if skip is None else skip | rows
            if skip is None:
                h = layer.mlp_block(h)
            else:
                keep = (~skip).nonzero()[:, 0]
                if keep.numel():
                    hk_ = h[:, keep]
                    h = h.clone()
                    h[:, keep] = layer.mlp_block(hk_)
        return h
