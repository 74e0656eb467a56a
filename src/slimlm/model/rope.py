"""Rotary position embeddings and their context-extension variants.

Each variant only changes the inverse frequencies (and, for YaRN, a scale on cos/sin):

- ``default``: inv_freq_i = theta^(-2i/d)  (RoFormer, Su et al. 2021)
- ``linear``: positions divided by ``factor`` (position interpolation, Chen et al. 2023)
- ``dynamic``: NTK-aware base rescaled from the current length once it passes
  ``max_position_embeddings``: theta' = theta * (factor * L / L_max - (factor - 1))^(d / (d - 2))
- ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth ramp between
- ``yarn``: per-frequency blend of interpolation and extrapolation (Peng et al. 2023, eq. 23)
  with the attention temperature 0.1 ln(s) + 1 folded into cos/sin.
"""

from __future__ import annotations

import math

import torch

from slimlm.model.config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale for ``cfg``.

    ``seq_len`` (max position + 1 of the current forward) only matters for ``dynamic``.
    """
    dim = cfg.head_dim
    params = cfg.rope_scaling or {}
    kind = params.get("rope_type", "default")
    theta = cfg.rope_theta
    if kind == "default":
        return _base_inv_freq(theta, dim), 1.0
    factor = float(params["factor"]) if params.get("factor") is not None else None
    if kind == "linear":
        return _base_inv_freq(theta, dim) / factor, 1.0
    if kind == "dynamic":
        max_pos = cfg.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        inv_freq = _base_inv_freq(theta, dim)
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(cfg, params, factor)
    raise ValueError(f"unknown rope type {kind!r}")


def _yarn(cfg: ModelConfig, params: dict, factor: float | None) -> tuple[torch.Tensor, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    orig = params["original_max_position_embeddings"]
    if factor is None:
        factor = cfg.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = params.get("attention_factor")
    if attn_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # weight of extrapolation per frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attn_factor)


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) for explicit position ids; no cache of positions, no state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dynamic = (cfg.rope_scaling or {}).get("rope_type") == "dynamic"

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, T, head_dim)
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.cfg.max_position_embeddings:
                inv_freq = rope_inv_freq(self.cfg, seq_len)[0].to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, d); cos/sin: (B, T, d). ``x * cos + rotate_half(x) * sin`` with the same
    roundings (each product, then the sum), without building ``rotate_half(x)``."""
    h = x.shape[-1] // 2
    c, s = cos[:, None], sin[:, None]
    out = x * c
    out[..., :h] -= x[..., h:] * s[..., :h]  # -x2 * s1 rounds to -(x2 * s1)
    out[..., h:] += x[..., :h] * s[..., h:]
    return out


def rotation(inv_freq: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, d) of a rotation by ``delta`` (B, T) positions, without the cos/sin scale:
    for re-rotating a query or key already rotated by the model's (scaled) cos/sin, since
    R(a) R(b) = R(a + b) (DCA's query rotations, CacheBlend's moved chunks)."""
    freqs = delta[..., None].float() * inv_freq  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
