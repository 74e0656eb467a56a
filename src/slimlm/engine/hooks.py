"""Per-layer compute hooks: the runner calls them between and inside decoder layers.

Token pruning, early exit and FFN skipping attach here without editing the model. A hook sees
the step's :class:`StepInfo` (which rows are decode tokens, their positions) and may change the
hidden states or ask the runner to skip a layer's MLP for some rows.

How to add one: subclass :class:`LayerHook`, override what you need, register it with
``@LAYER_HOOKS.register("name")``, and add it to the parametrized test in tests/engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.registry import Registry


@dataclass
class StepInfo:
    positions: torch.Tensor
    """(T,) position of each row of the step."""
    num_decode_rows: int
    """Rows [0, num_decode_rows) are single-token (decode) chunks."""


class LayerHook:
    def begin_step(self, info: StepInfo) -> None:
        """Called once per step before the first layer."""

    def before_layer(self, layer: int, h: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """h: (1, T, D). Return the hidden states the layer should see."""
        return h

    def skip_mlp_rows(self, layer: int, info: StepInfo) -> torch.Tensor | None:
        """Bool (T,) rows whose MLP sub-block is skipped in ``layer`` (None: skip none)."""
        return None


LAYER_HOOKS: Registry[LayerHook] = Registry("layer hook")


@LAYER_HOOKS.register("ffn_skip")
@dataclass
class FFNSkip(LayerHook):
    """Static FFN skipping for decode tokens in chosen layers: the baseline that FFN-SkipLLM
    (Jaiswal et al. 2024) improves on by choosing layers per token. Lossy; off by default."""

    layers: list[int] = field(default_factory=list)

    def skip_mlp_rows(self, layer: int, info: StepInfo) -> torch.Tensor | None:
        if layer not in self.layers or info.num_decode_rows == 0:
            return None
        rows = torch.zeros(info.positions.shape[0], dtype=torch.bool, device=info.positions.device)
        rows[: info.num_decode_rows] = True
        return rows
