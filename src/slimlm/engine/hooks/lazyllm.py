"""LazyLLM: dynamic token pruning in prefill (Fu et al., 2024).

Not every prompt token matters for the next token. At chosen layers LazyLLM ranks the prompt
tokens by the attention the last token gives them and lets only the top fraction continue to
the deeper layers, progressively (fewer tokens at each pruning layer); time to first token
drops because the deeper layers process fewer rows.

In the engine, per prefill chunk: at each pruning layer the chunk's last row (the prompt's
last token for the chunk that completes it; for earlier chunks of a long prompt, their last
token stands in) scores the chunk's still-running rows with the layer's own query/key
projections (softmax over the chunk, mean over heads); the top ``keep`` fraction continues
and the rest leave. A pruned token's hidden state is carried up unchanged (it is its
auxiliary cache) and its keys/values in the deeper layers are computed from it, so decode
steps and later chunks still find every token in every layer. LazyLLM instead revives pruned
tokens exactly when a later step selects them; that revival is not built: here the deep KV of
a pruned token stays the approximation from its carried hidden state. Lossy; off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.engine.hooks.base import LAYER_HOOKS, LayerHook, StepInfo
from slimlm.model.rope import apply_rope
from slimlm.model.transformer import CausalLM, RowPlan


@LAYER_HOOKS.register("lazyllm")
@dataclass
class LazyLLM(LayerHook):
    prefix_exact = False

    layers: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])
    """Pruning layers, as fractions of the depth (floats in (0, 1)) or layer indices (ints)."""
    keep: list[float] = field(default_factory=lambda: [0.5, 0.25])
    """Fraction of a chunk's tokens still running after each pruning layer (non-increasing)."""
    min_tokens: int = 64
    """Chunks shorter than this are not pruned."""

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.keep) or not self.layers:
            raise ValueError(f"lazyllm needs one keep ratio per pruning layer, got layers={self.layers}, "
                             f"keep={self.keep}")
        if any(not 0.0 < k <= 1.0 for k in self.keep) or any(a < b for a, b in zip(self.keep, self.keep[1:])):
            raise ValueError(f"lazyllm keep ratios must be in (0, 1] and non-increasing, got {self.keep}")
        self._at: dict[int, float] = {}
        self.model: CausalLM | None = None

    def bind(self, model: CausalLM) -> None:
        n = model.cfg.num_layers
        at = {}
        for x, k in zip(self.layers, self.keep):
            i = int(x) if isinstance(x, int) else int(round(x * n))
            if not 0 < i < n:
                raise ValueError(f"lazyllm pruning layer {x} is outside the model's layers 1..{n - 1}")
            at[i] = k
        self._at, self.model = at, model

    def plan(self, layer: int, h: torch.Tensor, info: StepInfo, active: torch.Tensor | None) -> RowPlan | None:
        ratio = self._at.get(layer)
        if ratio is None or not info.segments:
            return None
        T = h.shape[1]
        run = torch.ones(T, dtype=torch.bool, device=h.device)
        if active is not None:
            run.zero_()
            run[active] = True
        changed = False
        for seg in info.segments:
            n = seg.end - seg.start
            if not seg.prefill or n < self.min_tokens:
                continue
            rows = torch.arange(seg.start, seg.end, device=h.device)[run[seg.start : seg.end]]
            target = max(1, int(n * ratio))
            if rows.numel() <= target:
                continue
            score = self._importance(layer, h, rows, seg.end - 1, info.positions)
            drop = rows[score.topk(rows.numel() - target, largest=False).indices]
            run[drop] = False
            run[seg.end - 1] = True  # the probe (the prompt's last token) always continues
            changed = True
        return RowPlan(q_rows=run.nonzero()[:, 0]) if changed else None

    def _importance(self, layer: int, h: torch.Tensor, rows: torch.Tensor, probe: int,
                    positions: torch.Tensor) -> torch.Tensor:
        """Attention of the probe row over ``rows`` at ``layer``, mean over heads: (n,)."""
        blk = self.model.model.layers[layer]
        att, cfg = blk.self_attn, self.model.cfg
        d = cfg.head_dim
        x = blk.input_layernorm(h[0, rows])  # (n, D)
        xp = blk.input_layernorm(h[0, probe : probe + 1])  # (1, D)
        cos, sin = self.model.rotary(positions[rows][None], h.dtype)
        cp, sp = self.model.rotary(positions[probe : probe + 1][None], h.dtype)
        k = apply_rope(att.k_proj(x).view(1, -1, cfg.num_kv_heads, d).transpose(1, 2), cos, sin)  # (1, Hkv, n, d)
        q = apply_rope(att.q_proj(xp).view(1, 1, cfg.num_heads, d).transpose(1, 2), cp, sp)  # (1, Hq, 1, d)
        k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 1)
        p = ((q @ k.transpose(-1, -2)).float() * self.model.attn_scale).softmax(-1)  # (1, Hq, 1, n)
        return p[0, :, 0].mean(0)
