"""Unquantized KV: rows stored in a floating dtype (the model's, or another one)."""

from __future__ import annotations

import torch

from slimlm.kvcache.codec.base import KV_CODECS, KVCodec, zeros

_NATIVE = {torch.float32: 0, torch.bfloat16: 1}


class PlainCodec(KVCodec):
    storage_dtype: torch.dtype

    def __init__(self, compute_dtype: torch.dtype, head_dim: int, role: str = "k"):
        super().__init__(compute_dtype, head_dim, role)
        self.storage_dtype = getattr(self, "fixed_dtype", None) or compute_dtype
        self.native_code = _NATIVE.get(self.storage_dtype)  # type: ignore[misc]

    @property
    def lossless(self) -> bool:
        return self.storage_dtype == self.compute_dtype

    def bytes_per_row(self, num_kv_heads: int) -> int:
        return num_kv_heads * self.head_dim * torch.empty((), dtype=self.storage_dtype).element_size()

    def allocate(self, num_blocks, block_size, num_kv_heads, device):
        return [zeros((num_blocks, block_size, num_kv_heads, self.head_dim), self.storage_dtype, device)]

    def write(self, tensors, slots, x):
        data = tensors[0]
        T, H, d = x.shape
        data.view(-1, H * d).index_copy_(0, slots, x.reshape(T, H * d).to(data.dtype))

    def read(self, tensors, blocks):
        return tensors[0].index_select(0, blocks).to(self.compute_dtype)


@KV_CODECS.register("auto")
class AutoCodec(PlainCodec):
    """The model's dtype (the default): exact."""


@KV_CODECS.register("float32")
class Float32Codec(PlainCodec):
    fixed_dtype = torch.float32


@KV_CODECS.register("bfloat16")
class BFloat16Codec(PlainCodec):
    fixed_dtype = torch.bfloat16


@KV_CODECS.register("float16")
class Float16Codec(PlainCodec):
    fixed_dtype = torch.float16
