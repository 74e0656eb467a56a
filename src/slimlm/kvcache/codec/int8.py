"""int8 KV: symmetric quantization with one scale per token and KV head.

Each row x (d,) of one head is stored as round(x / s) in int8 with s = max|x| / 127 (an fp16
scale). Per-token scales, because a token's keys and values arrive once and are never
re-quantized: the row's scale is known when it is written, in prefill and decode alike, and
blocks stay independent (prefix sharing, copies and compaction move rows with their scales).
Per-token-per-head is the granularity of KIVI's value cache and of vLLM's per-token int8; the
error per element is at most s / 2 = max|x| / 254. Storage: d + 2 bytes per token-head
(66 for d = 64, against 256 in fp32 and 128 in bf16).
"""

from __future__ import annotations

import torch

from slimlm.kvcache.codec.base import KV_CODECS, KVCodec, native_quantize, zeros

NATIVE = True
"""Quantize with the native kernel where it runs (the same bytes; False: PyTorch only)."""
ROTATE: tuple[str, ...] = ()
"""The pools stored rotated (none: int8 is within its target unrotated; an experiment knob)."""


@KV_CODECS.register("int8")
class Int8Codec(KVCodec):
    native_code = 2

    def __init__(self, compute_dtype: torch.dtype, head_dim: int, role: str = "k"):
        super().__init__(compute_dtype, head_dim, role)
        self.rotates = role in ROTATE

    def bytes_per_row(self, num_kv_heads: int) -> int:
        return num_kv_heads * (self.head_dim + 2)

    def allocate(self, num_blocks, block_size, num_kv_heads, device):
        return [zeros((num_blocks, block_size, num_kv_heads, self.head_dim), torch.int8, device),
                zeros((num_blocks, block_size, num_kv_heads), torch.float16, device)]

    def write(self, tensors, slots, x):
        data, scale = tensors
        T, H, d = x.shape
        if NATIVE and native_quantize(x, slots, 2, tensors, None, self.rotates):
            return
        xf = self.to_storage(x.float())
        s = (xf.abs().amax(-1) / 127.0).clamp(min=1e-8)  # (T, H)
        s16 = s.to(torch.float16)
        q = (xf / s16.float()[..., None]).round().clamp(-127, 127).to(torch.int8)  # (T, H, d)
        data.view(-1, H * d).index_copy_(0, slots, q.reshape(T, H * d))
        scale.view(-1, H).index_copy_(0, slots, s16)

    def read(self, tensors, blocks):
        data, scale = tensors
        q = data.index_select(0, blocks)  # (n, B, H, d)
        s = scale.index_select(0, blocks)  # (n, B, H)
        return self.from_storage(q.float() * s.float()[..., None]).to(self.compute_dtype)
