"""The one attention function every path goes through, and the masks it takes.

Every caller (plain forward, training with document masks, the reference decoder's KV cache,
the engine's paged KV cache) reduces attention to ``attention(q, k, v, mask)`` where the mask
is built from explicit positions and segment ids by :func:`build_mask`. A new cache layout only
has to produce (k, v, their positions) for the queries it serves.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q: (B, Hq, Tq, d); k, v: (B, Hkv, Tk, d) with Hq % Hkv == 0; mask: bool, True = may attend,
    broadcastable to (B, 1, Tq, Tk), or None for full attention. Returns (B, Hq, Tq, d).

    On the CPU, half-precision inputs are computed in float32: PyTorch's CPU SDPA kernels are
    several times slower in bfloat16 than in float32 (and float32 softmax is the more exact).
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return attention(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def build_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal mask from explicit positions: query i may see key j iff they share a segment,
    pos_k[j] <= pos_q[i] and (with a window) pos_q[i] - pos_k[j] < window.

    q_pos, q_seg: (B, Tq); k_pos, k_seg: (B, Tk). Returns bool (B, 1, Tq, Tk). Segments give
    packed batches (documents or prompts sharing one row) and padding (segment -1 on the keys).
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # (B, Tq, 1), (B, 1, Tk)
    mask = kp <= qp
    if window is not None:
        mask = mask & (qp - kp < window)
    if q_seg is not None and k_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask[:, None]  # (B, 1, Tq, Tk)


class AttentionBackend(Protocol):
    """Where a layer's keys and values go and which of them each query sees.

    ``attend`` receives the new tokens' q (B, Hq, T, d) and k, v (B, Hkv, T, d), already rotated,
    stores k and v if it caches them, and returns the attention output (B, Hq, T, d). With
    ``q_rows`` (R,) only those rows query: q is (B, Hq, R, d) and so is the output.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_rows: torch.Tensor | None = None) -> torch.Tensor: ...


class DenseAttention:
    """No cache: the tokens of this forward attend to each other (training, scoring, parity).

    ``segment_ids`` (B, T) separate packed documents; a key of segment -1 is padding.
    """

    def __init__(
        self,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None,
        scale: float,
        windows: dict[int, int | None],
    ):
        self.position_ids, self.segment_ids, self.scale = position_ids, segment_ids, scale
        self.windows = windows
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            p, s = self.position_ids, self.segment_ids
            self._masks[window] = build_mask(p, p, s, s, window)
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``q_rows``: the rows of ``q`` among the T keys' rows (a per-layer row plan)."""
        mask = self.mask(self.windows.get(layer))
        if q_rows is not None:
            mask = mask[:, :, q_rows]
        return attention(q, k, v, mask, self.scale)
