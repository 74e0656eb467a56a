"""Modules over packed weights: QuantLinear (a drop-in for nn.Linear) and QuantEmbedding.

The packed tensors are buffers named ``qweight``, ``scales`` (and ``mins`` for int4), so a
quantized model's ``state_dict`` is its checkpoint: saved and loaded like any other, with the
format of each module recorded in config.json (``quantization_config``, see ``quant/checkpoint.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.model.quant.formats import Int4Weight, Int8Weight, PackedWeight, native_linear


def _empty(kind: str, N: int, K: int, G: int) -> PackedWeight:
    if kind == "int8":
        return Int8Weight(torch.empty(N, K, dtype=torch.int8), torch.empty(N, K // G), G)
    if kind == "int4":
        return Int4Weight(torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(N, K // G), torch.empty(N, K // G), G)
    raise ValueError(f"unknown packed kind {kind!r}; valid: int8, int4")


class _Packed(nn.Module):
    def __init__(self, packed: PackedWeight):
        super().__init__()
        self.kind, self.group_size = packed.kind, packed.group_size
        self.out_features, self.in_features = packed.shape
        for name, t in packed.tensors().items():
            self.register_buffer(name, t)

    def packed(self) -> PackedWeight:
        if self.kind == "int8":
            return Int8Weight(self.qweight, self.scales, self.group_size)
        return Int4Weight(self.qweight, self.scales, self.mins, self.group_size)

    def share(self, other: _Packed) -> None:
        """Use ``other``'s buffers (tied embeddings: the head and the embedding are one tensor)."""
        for name in other.packed().tensors():
            setattr(self, name, getattr(other, name))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}, group_size={self.group_size}"


class QuantLinear(_Packed):
    """``y = x @ W^T (+ bias)`` with W packed; the output has x's dtype."""

    native = True
    """Use the native kernel for few rows (set False on an instance to test the fallback)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__(packed)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def empty(cls, kind: str, out_features: int, in_features: int, group_size: int, bias: bool) -> QuantLinear:
        b = torch.empty(out_features) if bias else None
        return cls(_empty(kind, out_features, in_features, group_size), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native_linear(self.kind, self.group_size, x, self._buffers) if self.native else None  # decode rows
        if y is None:
            y = self.packed().matmul(x, False)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantEmbedding(_Packed):
    """Embedding lookup from a packed (vocab, D) table; rows de-quantized to ``dtype``."""

    def __init__(self, packed: PackedWeight, dtype: torch.dtype = torch.float32):
        super().__init__(packed)
        self.dtype = dtype

    @classmethod
    def empty(cls, kind: str, num: int, dim: int, group_size: int) -> QuantEmbedding:
        return cls(_empty(kind, num, dim, group_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed().rows(ids, self.dtype)  # (*ids.shape, D)
