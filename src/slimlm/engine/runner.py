"""The model runner: turns a SchedulerOutput into one forward pass over the paged KV cache.

It never decides who runs. Per step it (1) copies forked blocks, (2) flattens all chunks into
one row — prepacking: prompts of different lengths share the row with their own positions, so
no compute goes to padding — (3) runs the layers with the step's :class:`PagedAttention` and
the registered hooks, and (4) returns logits only for the rows that need them.
"""

from __future__ import annotations

import torch

from slimlm.engine.hooks import LayerHook, StepInfo
from slimlm.engine.paged_attention import DecodeGroup, PagedAttention, PagedKVCache, PrefillSegment, kept_blocks
from slimlm.engine.sched_output import SchedulerOutput
from slimlm.kvcache.policy.base import AttentionSpan
from slimlm.model.transformer import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, span: AttentionSpan, hooks: list[LayerHook]):
        self.model, self.cache, self.span, self.hooks = model, cache, span, hooks
        self.device = model.device
        self.windows = model.windows()

    def _tensor(self, x) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[int, torch.Tensor]:
        """Returns {seq_id: logits (num_logits, V)} for chunks that asked for logits."""
        self.cache.copy_blocks(out.block_copies)
        bs = self.cache.block_size
        ids, pos, slots = [], [], []
        logit_rows: list[int] = []
        decode_q, decode_blocks, decode_kpos = [], [], []
        prefills: list[PrefillSegment] = []
        row = 0
        n_decode = sum(1 for c in out.chunks if len(c.token_ids) == 1)
        nb_max = max((len(kept_blocks(c.block_table, c.start + 1, bs)[0])
                      for c in out.chunks[:n_decode]), default=0)
        for i, c in enumerate(out.chunks):
            T = len(c.token_ids)
            p = list(range(c.start, c.start + T))
            ids += c.token_ids
            pos += p
            slots += [c.block_table[x // bs] * bs + x % bs for x in p]
            logit_rows += range(row + T - c.num_logits, row + T)
            phys, logical = kept_blocks(c.block_table, c.start + T, bs)
            if i < n_decode:
                pad = nb_max - len(phys)
                decode_q.append([c.start])
                decode_blocks += phys + [0] * pad
                decode_kpos.append([lb * bs + j for lb in logical for j in range(bs)] + [-1] * (pad * bs))
            elif c.start == 0 and self.span.window is None:  # the chunk is its whole context
                prefills.append(PrefillSegment(slice(row, row + T), self._tensor([p]), None, self._tensor([p])))
            else:
                kpos = [lb * bs + j for lb in logical for j in range(bs)]
                prefills.append(PrefillSegment(slice(row, row + T), self._tensor([p]), self._tensor(phys),
                                               self._tensor([kpos])))
            row += T
        decode = None
        if n_decode:
            decode = DecodeGroup(slice(0, n_decode), self._tensor(decode_q), self._tensor(decode_blocks),
                                 self._tensor(decode_kpos), nb_max)
        positions = self._tensor([pos])  # (1, T)
        attn = PagedAttention(self.cache, self._tensor(slots), decode, prefills, self.span, self.windows,
                              self.model.attn_scale, self.model.rotary)
        h = self._forward(self._tensor([ids]), positions, attn, StepInfo(positions[0], n_decode))
        logits = self.model.head(h[0, logit_rows])  # (R, V)
        res, r = {}, 0
        for c in out.chunks:
            if c.num_logits:
                res[c.seq_id] = logits[r : r + c.num_logits]
                r += c.num_logits
        return res

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
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, attn)
            skip = None
            for hk in hooks:
                rows = hk.skip_mlp_rows(i, info)
                if rows is not None:
                    skip = rows if skip is None else skip | rows
            if skip is None:
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            else:
                keep = (~skip).nonzero()[:, 0]
                if keep.numel():
                    hk_ = h[:, keep]
                    h = h.clone()
                    h[:, keep] = hk_ + layer.mlp(layer.post_attention_layernorm(hk_))
        return h
