"""The LM head of a dense model for few rows by a native GEMV (``kernels/dense_linear.c``).

At batch 1 the head reads the whole vocabulary matrix every token (SmolLM2-135M: 49152 x 576,
113 MB in float32, 56 MB in bfloat16, tied to the embedding), ~20 % of a decode step; PyTorch's
one-row matmul reads it slower than the memory allows (bf16 worst: its one-row kernel is not the
oneDNN one it takes for several rows). :class:`NativeHead` replaces ``model.head`` in the runner
for steps with up to ``DENSE_MAX_ROWS`` logit rows: the final RMSNorm is the model's own (PyTorch,
unchanged), the GEMV native in the weight's precision, the logits returned in the model's dtype.

Exact up to summation order in both dtypes: float32 as any fp32 matmul; bfloat16 because the
normed rows are already bf16, so the product of two bf16 values is exact in the fp32 accumulator
whichever kernel runs (widened weights, or ``vdpbf16ps``), as in PyTorch's bf16 matmul.

Packed models are not handled here: their head is a :class:`QuantLinear` (int8 per channel, or the
GGUF file's own type), already on the native packed kernels. ``SLIMLM_NATIVE_HEAD=0`` turns this off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from slimlm.model.quant.native_layers import DENSE_MAX_ROWS, DTYPES

ENV = "SLIMLM_NATIVE_HEAD"


def native_head(model) -> NativeHead | None:
    """A native head for this model, or None (a :class:`CausalLM` with its own ``head``, a dense
    float32 / bfloat16 ``nn.Linear`` head on the CPU, no bias, a compiled kernel;
    ``SLIMLM_NATIVE_HEAD`` not 0)."""
    from slimlm.model.transformer import CausalLM

    if os.environ.get(ENV, "1") == "0" or not isinstance(model, CausalLM) or type(model).head is not CausalLM.head:
        return None  # another model class (a draft's shallow model), or a head of its own
    if model.device.type != "cpu":
        return None
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None or head.weight.dtype not in DTYPES:
        return None
    from slimlm import kernels

    lib = kernels.load("decode_layer")
    return None if lib is None else NativeHead(lib, model)


class NativeHead:
    def __init__(self, lib, model):
        from slimlm.model.quant.huge_pages import to_huge_pages

        self.lib, self.model = lib, model
        self.huge_bytes = to_huge_pages(model, [model.lm_head.weight])
        """Bytes of the head's weight (tied: the embedding) moved onto 2 MiB pages (``huge_pages.py``)."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """``model.head(h)`` for h (R, D): logits (R, V) in the model's dtype."""
        m = self.model
        lin = m.lm_head
        R = h.shape[0] if h.dim() == 2 else 0
        if (type(lin) is not nn.Linear or lin.bias is not None or lin.weight.dtype not in DTYPES
                or not lin.weight.is_contiguous() or not 0 < R <= DENSE_MAX_ROWS):
            return m.head(h)  # the head was replaced, or too many rows: PyTorch's
        w = lin.weight
        x = m.model.norm(h)
        if m.logit_mult != 1.0:
            x = x * m.logit_mult
        x = x.float().contiguous()  # (R, D); exact for bf16 rows
        V, D = w.shape
        y = torch.empty(R, V)
        kind = 0 if w.dtype == torch.float32 else 2 if self.lib.slimlm_dense_has_dpbf16() else 1
        rc = self.lib.slimlm_dense_linear(x.data_ptr(), w.data_ptr(), kind, y.data_ptr(), R, V, D,
                                          torch.get_num_threads())
        if rc:
            raise RuntimeError(f"dense_linear kernel failed (code {rc})")
        return y if w.dtype == torch.float32 else y.to(w.dtype)
