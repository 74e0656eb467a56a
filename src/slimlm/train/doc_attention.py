"""Document-masked attention for training without a dense T x T mask (``train.attention``).

Packed rows (``data.packing = "document"``) hold several documents; the default ``dense`` path
builds a (B, 1, T, T) boolean mask from segment and position ids and hands it to SDPA, which then
computes every query-key pair of the row and masks most of them away. Two replacements compute
the same attention (tested against the dense path, forward and gradients):

- ``varlen``: each document of each row is its own causal sequence. Documents of equal length are
  gathered into one (n, H, L, d) batch and run through SDPA with ``is_causal=True`` (no mask
  tensor; the kernel skips the upper triangle), one call per distinct length, and scattered back.
  The work is sum(len_i^2) instead of B T^2. Rows without segment ids (``concat`` packing, the
  ``varlen`` sampler's one-document rows) take one ``is_causal`` call. Runs on any device.
- ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built once per batch from
  the segment ids (blocks wholly outside every document are skipped). Its backward has no CPU
  implementation in torch 2.13, so training with it needs CUDA; on the CPU it runs forward only
  (held-out evaluation, tests). Use ``train.compile`` with it on GPU (the eager version is a
  reference implementation).

Layers with a sliding window and per-layer row plans fall back to the dense mask.
The trainer installs the chosen path on its model instance (``install``): the model's
``dense_attention`` factory is replaced, so ``CausalLM.forward`` and every objective use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.model.attention import DenseAttention

ATTENTION_PATHS = ("dense", "varlen", "flex")


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):  # as model.attention.attention
        return _sdpa_causal(q.float(), k.float(), v.float(), scale).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def document_spans(segment_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """(B, T) segment ids (contiguous runs) -> {length L: (n, L) flat token indices into B*T}."""
    B, T = segment_ids.shape
    seg = segment_ids.cpu()
    change = torch.ones(B, T, dtype=torch.bool)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = change.flatten().nonzero().flatten()  # flat index of each document's first token
    ends = torch.cat([starts[1:], torch.tensor([B * T])])
    row_end = (starts // T + 1) * T
    ends = torch.minimum(ends, row_end)  # a run never crosses a row boundary
    lengths = ends - starts
    out: dict[int, torch.Tensor] = {}
    for L in lengths.unique().tolist():
        s = starts[lengths == L]
        out[int(L)] = (s[:, None] + torch.arange(L)).to(segment_ids.device)  # (n, L)
    return out


class VarlenAttention(DenseAttention):
    """Per-document causal SDPA (no mask tensor); dense fallback for windows and row plans."""

    def __init__(self, position_ids, segment_ids, scale, windows):
        super().__init__(position_ids, segment_ids, scale, windows)
        self.spans = None if segment_ids is None else document_spans(segment_ids)

    def attend(self, layer, q, k, v, q_rows=None):
        if q_rows is not None or self.windows.get(layer) is not None:
            return super().attend(layer, q, k, v, q_rows)
        if self.spans is None or len(self.spans) == 1 and next(iter(self.spans)) == q.shape[2]:
            return _sdpa_causal(q, k, v, self.scale)  # one document per row
        B, Hq, T, d = q.shape
        flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], d) for x in (q, k, v)]  # (B*T, H, d)
        out = None  # in the attention's output dtype (bf16 under autocast while q is fp32)
        for L, idx in self.spans.items():
            qs, ks, vs = (x[idx].transpose(1, 2) for x in flat)  # (n, H, L, d)
            r = _sdpa_causal(qs, ks, vs, self.scale).transpose(1, 2).reshape(-1, Hq, d)
            out = (r.new_empty(B * T, Hq, d) if out is None else out).index_put((idx.flatten(),), r)
        return out.view(B, T, Hq, d).transpose(1, 2)


class FlexAttention(DenseAttention):
    """flex_attention with a block mask of the documents (causal within each segment)."""

    def __init__(self, position_ids, segment_ids, scale, windows):
        super().__init__(position_ids, segment_ids, scale, windows)
        from torch.nn.attention.flex_attention import create_block_mask

        B, T = position_ids.shape
        seg = segment_ids if segment_ids is not None else torch.zeros_like(position_ids)
        pos = position_ids

        def mask_mod(b, h, qi, ki):
            return (seg[b, qi] == seg[b, ki]) & (pos[b, ki] <= pos[b, qi])

        self.block_mask = create_block_mask(mask_mod, B, None, T, T, device=position_ids.device)

    def attend(self, layer, q, k, v, q_rows=None):
        if q_rows is not None or self.windows.get(layer) is not None:
            return super().attend(layer, q, k, v, q_rows)
        from torch.nn.attention.flex_attention import flex_attention

        dtype = q.dtype
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            q, k, v = q.float(), k.float(), v.float()
        out = flex_attention(q, k, v, block_mask=self.block_mask, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.to(dtype)


BACKENDS = {"dense": DenseAttention, "varlen": VarlenAttention, "flex": FlexAttention}


def install(model: torch.nn.Module, kind: str) -> None:
    """Make ``model`` (a CausalLM) build ``kind`` attention whenever no backend is passed."""
    if kind not in BACKENDS:
        raise ValueError(f"train.attention must be one of {', '.join(ATTENTION_PATHS)}; got '{kind}'")
    if kind == "dense":
        model.__dict__.pop("dense_attention", None)
        return
    cls = BACKENDS[kind]

    def factory(position_ids, segment_ids=None):
        return cls(position_ids, segment_ids, model.attn_scale, model.windows())

    model.dense_attention = factory  # instance attribute: shadows CausalLM.dense_attention
