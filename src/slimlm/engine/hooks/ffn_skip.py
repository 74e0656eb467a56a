"""Static FFN skipping: generated tokens skip the MLP of chosen layers.

The baseline that FFN-SkipLLM (Jaiswal et al. 2024) improves on by choosing layers per token.
A row skips when it holds a generated token (its position is past the prompt), decided by
position rather than by chunk shape, so the output does not depend on chunk boundaries,
prefix-cache hits or recomputation after preemption. Lossy; off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.engine.hooks.base import LAYER_HOOKS, LayerHook, StepInfo
from slimlm.model.transformer import RowPlan


@LAYER_HOOKS.register("ffn_skip")
@dataclass
class FFNSkip(LayerHook):
    prefix_exact = False

    layers: list[int] = field(default_factory=list)
    """Layers whose MLP generated tokens skip."""

    def plan(self, layer: int, h: torch.Tensor, info: StepInfo, active: torch.Tensor | None) -> RowPlan | None:
        if layer not in self.layers or info.row_output is None or not bool(info.row_output.any()):
            return None
        return RowPlan(mlp_rows=(~info.row_output).nonzero()[:, 0])
