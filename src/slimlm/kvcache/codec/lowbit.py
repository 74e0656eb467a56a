"""Below int4: 3- and 4-bit KV with one byte of scale per group, symmetric levels and both pools
Hadamard-rotated (issue 16's ">= 5x less KV than the model's dtype"; docs/techniques.md,
"Low-bit KV").

Two layouts, one code (``LAYOUTS``; bytes per token and KV head at head size 64, K + V):

- ``"int3"``: keys 3-bit in groups of 32, values 3-bit in groups of 64: 26 + 25 = **51 bytes,
  5.02x less than bf16** (256) by the codec alone.
- ``"int4s"``: keys 4-bit in groups of 32, values 4-bit in groups of 64: 34 + 33 = 67 bytes,
  3.82x less than bf16 (int4: 88, 2.91x), for a composition with a token budget (H2O).

Where int4 (``codec/int4.py``) spends 4 bytes a group on an fp16 scale and minimum, the budget
below it (<= 51.2 bytes for 5x against bf16) leaves almost nothing beyond the codes, so:

- **Both pools rotated.** Keys lose their static per-channel mean first (as int4's keys do,
  ``codec/offsets.py``), then keys and values are Hadamard-rotated (``codec/rotation.py``): the
  rows become close to zero-mean Gaussians, which a symmetric quantizer with one scale per group
  covers; no minimum is stored. Unrotated 3-bit values cost +20.6 % perplexity against +1.3 %
  rotated. Values take no offset by default (``OFFSETS``): a value offset is exact (attention
  weights sum to 1, so sum_i p_i (v_i - mu) + mu = sum_i p_i v_i) but measured worse, +6.3 %
  against +1.3 % at 3 bits: the attention-sink token's value is close to zero and takes most of
  a head's attention, and shifted by -mu its quantization error is no longer small.
- **Symmetric levels without a zero.** A group takes codes c in [0, 2^b) for the levels
  (c - (2^b - 1) / 2) s: 8 levels at 3 bits, +-s/2 .. +-7s/2, all used (a zero level would waste
  one of eight on a Gaussian).
- **A one-byte scale.** s = 2^((e - BIAS) / 16), e a byte: steps of 4.4 %, scales from 2^-11 to
  2^4.9 (groups up to +-107 at 3 bits and +-230 at 4; larger values clip). The exponent is chosen
  per group as the one of ``SEARCH`` candidates, from the one covering max |x| downwards, with the
  least squared error: MSE-optimal clipping (a Gaussian group's largest value is not worth a level
  of its own), which also makes the byte's rounding harmless.

Storage: d b / 8 + d / g bytes per token-head and pool. Codes are packed eight to b bytes (bit
order little-endian within each group of 8). ``docs/results/raw/kv_lowbit_study.py`` is the
dense study that chose the layouts (prose perplexity at 2,048 tokens: int3 +14.5 %, int4s +2.7 %,
int4 +1.9 %).

The native kernels do not read these pools (``native_code`` None): an engine with them attends
through the PyTorch paths (the context decoded into a workspace), every feature included
(policies, MiniCache, prefix caching, preemption), slower than int4's native kernels.
"""

from __future__ import annotations

import torch

from slimlm.kvcache.codec.base import KV_CODECS, KVCodec, zeros

LAYOUTS = {"int3": ({"k": 3, "v": 3}, {"k": 32, "v": 64}),
           "int4s": ({"k": 4, "v": 4}, {"k": 32, "v": 64})}
"""Per registered name: (bits per code, channels per scale byte), keys and values (2-4 bits; a head
size smaller than a group takes one group a row; set before the engine starts)."""
ROTATE: tuple[str, ...] = ("k", "v")
"""The pools stored Hadamard-rotated."""
OFFSETS: tuple[str, ...] = ("k",)
"""The pools that take the engine's static per-channel offsets (``codec/offsets.py``; values
measured worse with them, see the module docstring)."""
SEARCH = 6
"""Scale exponents tried per group, from the one that covers max |x| downwards (1: no clipping)."""
BIAS = 176
"""The scale byte's zero: s = 2^((e - BIAS) / 16)."""


def pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes c (..., n) uint8 < 2^bits, n a multiple of 8 -> (..., n * bits / 8) uint8."""
    *lead, n = c.shape
    g = c.reshape(*lead, n // 8, 8).to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=c.device) * bits
    word = (g << shifts).sum(-1)  # (..., n/8) < 2^(8 bits) <= 2^32
    out = torch.stack([(word >> (8 * j)) & 255 for j in range(bits)], -1)
    return out.to(torch.uint8).reshape(*lead, n * bits // 8)


def unpack(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (..., n * bits / 8) uint8 -> codes (..., n) int64."""
    *lead, _ = p.shape
    b = p.reshape(*lead, n // 8, bits).to(torch.int64)
    word = sum(b[..., j] << (8 * j) for j in range(bits))
    shifts = torch.arange(8, dtype=torch.int64, device=p.device) * bits
    return ((word[..., None] >> shifts) & (2**bits - 1)).reshape(*lead, n)


def quantize(g: torch.Tensor, bits: int, search: int = SEARCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups g (..., n) float32 -> (codes (..., n) uint8, scale exponents (...) uint8)."""
    half = (2**bits - 1) / 2
    a = g.abs().amax(-1).clamp(min=1e-30)
    e0 = (torch.ceil(16 * torch.log2(a / half)) + BIAS).clamp(0, 255)
    best_c, best_e, err = None, None, None
    for j in range(max(1, search)):
        e = (e0 - j).clamp(min=0)
        s = torch.exp2((e - BIAS) / 16)[..., None]
        c = (g / s + half).round().clamp(0, 2 * half)  # level (c - half) s
        er = ((c - half) * s - g).pow(2).sum(-1)
        if best_c is None:
            best_c, best_e, err = c, e, er
        else:
            better = er < err
            best_c = torch.where(better[..., None], c, best_c)
            best_e, err = torch.where(better, e, best_e), torch.minimum(er, err)
    return best_c.to(torch.uint8), best_e.to(torch.uint8)


def dequantize(c: torch.Tensor, e: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., n) and exponents (...) -> values (..., n) float32."""
    half = (2**bits - 1) / 2
    return (c.float() - half) * torch.exp2((e.float() - BIAS) / 16)[..., None]


class LowBitCodec(KVCodec):
    """One layout of ``LAYOUTS`` (the subclass's ``name``)."""

    native_code = None

    def __init__(self, compute_dtype: torch.dtype, head_dim: int, role: str = "k"):
        super().__init__(compute_dtype, head_dim, role)
        bits, groups = LAYOUTS[self.name]
        self.bits = bits[role]
        self.group = min(groups[role], head_dim)
        if self.bits not in (2, 3, 4) or head_dim % self.group or self.group % 8:
            raise ValueError(f"kv_cache_dtype={self.name!r} needs 2-4 bits and groups of a multiple of 8 channels "
                             f"that divide the head size, got {self.bits} bits, groups of {self.group}, "
                             f"head size {head_dim}")
        self.groups = head_dim // self.group
        self.rotates = role in ROTATE
        self.wants_key_offsets = role == "k" and "k" in OFFSETS
        self.wants_value_offsets = role == "v" and "v" in OFFSETS

    def bytes_per_row(self, num_kv_heads: int) -> int:
        return num_kv_heads * (self.head_dim * self.bits // 8 + self.groups)

    def allocate(self, num_blocks, block_size, num_kv_heads, device):
        return [zeros((num_blocks, block_size, num_kv_heads, self.head_dim * self.bits // 8), torch.uint8, device),
                zeros((num_blocks, block_size, num_kv_heads, self.groups), torch.uint8, device)]  # scale exponents

    def write(self, tensors, slots, x):
        data, expo = tensors
        T, H, d = x.shape
        mu = self.offset(tensors)
        xf = self.to_storage(x.float() - mu if mu is not None else x.float())
        c, e = quantize(xf.reshape(T, H, self.groups, self.group), self.bits)
        packed = pack(c.reshape(T, H, d), self.bits)
        data.view(-1, H * packed.shape[-1]).index_copy_(0, slots, packed.reshape(T, -1))
        expo.view(-1, H * self.groups).index_copy_(0, slots, e.reshape(T, -1))

    def read(self, tensors, blocks):
        data, expo = tensors
        p = data.index_select(0, blocks)  # (n, B, H, d bits / 8)
        n, B, H, _ = p.shape
        c = unpack(p, self.bits, self.head_dim).view(n, B, H, self.groups, self.group)
        x = dequantize(c, expo.index_select(0, blocks), self.bits).view(n, B, H, self.head_dim)
        x = self.from_storage(x)
        mu = self.offset(tensors)
        return (x + mu if mu is not None else x).to(self.compute_dtype)


@KV_CODECS.register("int3")
class Int3Codec(LowBitCodec):
    """3-bit keys (groups of 32) and values (groups of 64): 51 bytes per token-head at d = 64."""


@KV_CODECS.register("int4s")
class Int4sCodec(LowBitCodec):
    """4-bit keys (groups of 32) and values (groups of 64), one-byte scales: 67 bytes at d = 64."""
