"""int4 KV: asymmetric 4-bit quantization in groups of channels, per token and KV head; keys
shifted by a static per-channel offset and Hadamard-rotated first.

Keys: k -> (k - mu) @ R, then quantized. mu (per storage and KV head, ``codec/offsets.py``) is
each channel's mean key, measured once at engine start on a short built-in text: the large
key channels are mostly a constant offset shared by every token, which a per-token quantizer
would spend its range on; subtracting it changes each query's scores by one constant, so
attention is exactly unchanged (and ``read`` adds mu back for the PyTorch readers). The
offsets cost no stored byte and no read-time work (the native kernels read the shifted rows
with the query as before). On SmolLM2-135M they take int4's perplexity change on 4,096 prose
tokens from +6.2 % to +4.3 % (docs/techniques.md, "int4 KV: group size, key rotation and key
offsets"; per-channel scales instead measured worse). A codec used outside an engine has no
offsets unless given them (``set_offset``).

A key row k (d,) of one head is first rotated, k @ R with R the normalized Hadamard matrix of
size d (a seeded random orthogonal matrix when d is not a power of two; ``codec/rotation.py``,
the QuaRot idea). Keys have a few large channels (the low-frequency RoPE pairs; KIVI, Liu et al.
2024): unrotated, a group's 15 steps are spent on them and the small channels round to a step
or two. The rotation spreads that energy over every channel, so each group's range shrinks to
the row's typical spread; attention is unchanged, (q R) . (k R) = q . k (the native decode
kernel gets the query rotated). Values are not rotated: they have no such channels, and
rotated they measured slightly worse (``docs/results/raw/kv_int4_study.py``; ``ROTATE``
selects the rotated pools, set before the engine starts: ``()`` is the unrotated codec).

The row is cut into groups of channels, ``GROUPS[role]`` (keys 16, values 32; a head size
that is not a multiple of 32 takes 16 for both); a group is stored as 4-bit codes
c = round((x - m) / s) in [0, 15] with m = min, s = (max - min) / 15 (fp16 scale and minimum),
two codes per byte. Asymmetric, because a group's values are rarely centred on zero and the
minimum costs two bytes. Per token (not KIVI's per channel over tokens) because a token's row
arrives once and is never re-quantized: blocks stay independent (prefix sharing, copies,
compaction) and the native kernels read them in place. Keys in groups of 16: they carry almost
all of int4's loss, and halving their groups took the perplexity change on 4,096 prose tokens
(SmolLM2-135M, fp32, native kernels) from +3.7 % to +1.7 % (bf16 model: +3.9 % -> +2.2 %, +1.9 %
with the prefill attending in float32: ``FP32_ATTENTION``); values
lose next to nothing at 32 (both in 16: +2.3 %; docs/techniques.md, "int4 at 2 %: keys in groups
of 16, native"). Storage: d / 2 + 4 * d / group bytes per token-head (keys 48, values 40
for d = 64, against 256 each in fp32). The native kernels read every combination of 16 / 32
(kv codes 3 .. 6 in kernels/kv_pool.h: ``native_code`` names both pools' layouts, so the key
and value codecs of one cache carry the same code).
"""

from __future__ import annotations

import torch

from slimlm.kvcache.codec.base import KV_CODECS, KVCodec, native_quantize, zeros

GROUPS = {"k": 16, "v": 32}
"""Channels per scale and minimum, keys and values (16 or 32; set before the engine starts)."""
NATIVE = True
"""Quantize with the native kernel where it runs (the same bytes; False: PyTorch only)."""
ROTATE: tuple[str, ...] = ("k",)
"""The pools stored rotated: keys (values lose slightly when rotated, see the module docstring)."""
FP32_ATTENTION = True
"""The native prefill kernel attends to int4 pools in float32 in a bf16 engine too
(``KVCodec.attend_fp32``: no bf16 rounding of the rotated query and the decoded rows; bf16
model, 4,096 prose tokens: +2.2 % -> +1.9 % perplexity against full KV; set before the engine starts)."""
OFFSETS = True
"""Keys take the engine's static per-channel offsets (``codec/offsets.py``; False: the codec
before them, an experiment knob set before the engine starts)."""


@KV_CODECS.register("int4")
class Int4Codec(KVCodec):
    native_code = 3

    def __init__(self, compute_dtype: torch.dtype, head_dim: int, role: str = "k"):
        super().__init__(compute_dtype, head_dim, role)
        self.rotates = role in ROTATE
        self.wants_key_offsets = role == "k" and OFFSETS
        self.attend_fp32 = FP32_ATTENTION
        groups = {r: self.group_of(r, head_dim) for r in ("k", "v")}
        self.group = groups[role]
        if head_dim % 16 or any(g not in (16, 32) for g in groups.values()):
            raise ValueError(f"kv_cache_dtype='int4' needs a head size divisible by 16 and groups of 16 or 32, "
                             f"got head size {head_dim} and groups {GROUPS}")
        self.groups = head_dim // self.group
        # kernels/kv_pool.h: 3 + (keys in 16) + 2 * (values in 16), one code for both pools
        self.native_code = 3 + (groups["k"] == 16) + 2 * (groups["v"] == 16)  # type: ignore[misc]
        self.pool_code = 3 if self.group == 32 else 6
        """The code the native encoder writes this pool with (its group size for keys and values)."""

    @staticmethod
    def group_of(role: str, head_dim: int) -> int:
        """The group size of the ``role`` pool for this head size."""
        g = GROUPS[role]
        return g if head_dim % g == 0 else 16

    def bytes_per_row(self, num_kv_heads: int) -> int:
        return num_kv_heads * (self.head_dim // 2 + 4 * self.groups)

    def allocate(self, num_blocks, block_size, num_kv_heads, device):
        return [zeros((num_blocks, block_size, num_kv_heads, self.head_dim // 2), torch.uint8, device),
                zeros((num_blocks, block_size, num_kv_heads, self.groups), torch.float16, device),  # scale
                zeros((num_blocks, block_size, num_kv_heads, self.groups), torch.float16, device)]  # min

    def write(self, tensors, slots, x):
        data, scale, mins = tensors
        T, H, d = x.shape
        mu = self.offset(tensors)
        if NATIVE and native_quantize(x, slots, self.pool_code, tensors, mu, self.rotates):
            return
        xf = self.to_storage(x.float() - mu if mu is not None else x.float())
        g = xf.view(T, H, self.groups, self.group)
        lo, hi = g.amin(-1), g.amax(-1)  # (T, H, G)
        s16 = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.float16)
        m16 = lo.to(torch.float16)
        c = ((g - m16.float()[..., None]) / s16.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
        c = c.view(T, H, d)
        packed = c[..., 0::2] | (c[..., 1::2] << 4)  # (T, H, d/2): even channel low nibble
        data.view(-1, H * d // 2).index_copy_(0, slots, packed.reshape(T, H * d // 2))
        scale.view(-1, H * self.groups).index_copy_(0, slots, s16.reshape(T, -1))
        mins.view(-1, H * self.groups).index_copy_(0, slots, m16.reshape(T, -1))

    def read(self, tensors, blocks):
        data, scale, mins = tensors
        p = data.index_select(0, blocks)  # (n, B, H, d/2)
        n, B, H, _ = p.shape
        c = torch.stack([p & 15, p >> 4], dim=-1).view(n, B, H, self.groups, self.group).float()
        s = scale.index_select(0, blocks).float()[..., None]  # (n, B, H, G, 1)
        m = mins.index_select(0, blocks).float()[..., None]
        x = self.from_storage((c * s + m).view(n, B, H, self.head_dim))
        mu = self.offset(tensors)
        return (x + mu if mu is not None else x).to(self.compute_dtype)
