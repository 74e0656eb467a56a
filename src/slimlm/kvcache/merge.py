"""Cross-layer KV merging (MiniCache, Liu et al. 2024): the maths, shared by the paged cache
and the dense reference in the tests.

Two adjacent layers l0 < l1 from the middle depth on store one row per token between them.
Each state x is split into its magnitude ||x|| and its direction x / ||x||; the directions of
the pair are interpolated on the sphere (SLERP, the paper's Eq. 3)

    e = sin((1 - t) Ω) / sin Ω · u0 + sin(t Ω) / sin Ω · u1,    Ω = arccos(u0 · u1),

and each layer gets back ``||x_l|| · e``: magnitudes stay per layer (fp16, as the paper keeps
them), only the direction is shared. Tokens whose two directions disagree most (angular
distance Ω / π above a threshold) are kept unmerged (the paper's token retention): the shared
row keeps l0's state and a retention row holds l1's.

Retention inside a paged cache: every block has ``rows`` retention rows per storage, handed
out in token order to the block's tokens above the threshold until they run out. The decision
for a token depends only on the tokens before it in its block, so it is the same whatever the
chunking, batching or preemption (a rewritten slot clears the states after it), and a shared
prefix block carries its own retention rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAGNITUDE_DTYPE = torch.float16
RAW, MERGED = 0, 1
"""Slot states: written by l0 only (its own state, unmerged), merged; r + 2 = retained in row r."""


@dataclass(frozen=True)
class MergeSpec:
    """How layers that share a storage merge (part of :class:`~slimlm.kvcache.spec.KVCacheSpec`)."""

    t: float = 0.5
    """SLERP weight of the deeper layer's direction (0.5: the midpoint)."""
    threshold: float = 0.05
    """Angular distance (Ω / π, in [0, 1]) above which a token is retained unmerged."""
    rows: int = 2
    """Retention rows per block and storage (at most this many unmerged tokens per block)."""


def slerp(x0: torch.Tensor, x1: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, x1 (..., d) -> merged direction e (..., d), magnitudes n0, n1 (...), angular distance
    Ω / π (...). Computed in float32; near-parallel pairs fall back to the normalized lerp."""
    a, b = x0.float(), x1.float()
    n0, n1 = a.norm(dim=-1), b.norm(dim=-1)
    u0 = a / n0.clamp(min=1e-12)[..., None]
    u1 = b / n1.clamp(min=1e-12)[..., None]
    cos = (u0 * u1).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    small = so < 1e-4
    w0 = torch.where(small, torch.full_like(omega, 1.0 - t), torch.sin((1.0 - t) * omega) / so.clamp(min=1e-4))
    w1 = torch.where(small, torch.full_like(omega, t), torch.sin(t * omega) / so.clamp(min=1e-4))
    e = w0[..., None] * u0 + w1[..., None] * u1
    e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # unit already, up to rounding
    return e, n0, n1, omega / torch.pi


def distance(dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Per token: the largest angular distance over its keys' and values' heads. dk, dv (T, H)."""
    return torch.maximum(dk.amax(-1), dv.amax(-1))


def retain(dist: torch.Tensor, blocks: torch.Tensor, used: torch.Tensor, threshold: float, rows: int) -> torch.Tensor:
    """Retention row (>= 0) or -1 per token. ``dist`` (T,) angular distances, ``blocks`` (T,)
    the block of each token (tokens of one block in storage order), ``used`` (T,) retention rows
    already taken in that block before this call. Tokens above ``threshold`` take the next free
    row of their block, in order, while rows remain."""
    want = dist > threshold
    if rows == 0 or not bool(want.any()):
        return torch.full_like(blocks, -1)
    T = blocks.numel()
    start = torch.ones(T, dtype=torch.bool, device=blocks.device)
    start[1:] = blocks[1:] != blocks[:-1]
    if int(start.sum()) == torch.unique(blocks).numel():  # each block's tokens in one run (a step's slots are)
        w = want.long()
        excl = w.cumsum(0) - w  # wanting tokens before each token in the step
        before = excl - excl[start][start.long().cumsum(0) - 1]  # ... in its own block's run
        row = used + before
        return torch.where(want & (row < rows), row, torch.full_like(row, -1))
    order = torch.arange(T, device=blocks.device)
    same = (blocks[:, None] == blocks[None, :]) & (order[None, :] < order[:, None])  # (T, T): earlier, same block
    before = (same & want[None, :]).sum(-1)  # wanting tokens before me in my block
    row = used + before
    return torch.where(want & (row < rows), row, torch.full_like(row, -1))
