"""SkipDecode: token-level early exit that batches and caches (Del Corro et al. 2023).

Each generated token skips a number of the *lower* layers and runs the upper ones (the paper
bypasses lower layers rather than exiting before the top, so every token still ends in the
last layers and the LM head). The number of skipped layers depends only on the token's
generated index g (its position minus the prompt length) and never decreases with it:

    skipped(g) = round((num_layers - min_layers) * min(g, ramp) / ramp)

so every row of a step with the same g skips the same layers (no row waits for another), and
the KV cache needs no recomputation: a later token skips at least the layers an earlier one
skipped, so at every layer it runs, every earlier token of its sequence has keys and values.
Skipped layers' KV, as in the paper, is not computed for the skipping token: when no row of
the step runs a layer it is not run at all; when other rows run it (prompts, tokens with a
smaller g), the skipping rows' keys and values there are written from the hidden state they
carry, and no query ever reads them. Prompt tokens run every layer.

The paper fine-tunes the model with this schedule; without it, skipping lower layers of a
pretrained model costs much quality (``slimlm train`` with the same schedule is not built
here; see docs/techniques.md). Lossy; off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.engine.hooks.base import LAYER_HOOKS, LayerHook, StepInfo
from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM


@LAYER_HOOKS.register("skipdecode")
@dataclass
class SkipDecode(LayerHook):
    prefix_exact = False

    min_layers: int | None = None
    """Layers a token runs at the end of the ramp (the exit point's floor); None = 3/4 of the
    model's layers. Must be in 1..num_layers."""
    ramp: int = 64
    """Generated tokens over which the skipped layers grow linearly to their maximum."""

    def __post_init__(self) -> None:
        if self.ramp < 1:
            raise SlimLMError(f"skipdecode ramp must be at least 1, got {self.ramp}")
        self.prompt_len: dict[int, int] = {}
        self._skip: torch.Tensor | None = None
        self.counts = {"layers_run": 0, "layers_skipped": 0}

    def bind(self, model: CausalLM) -> None:
        n = model.cfg.num_layers
        if self.min_layers is None:
            self.min_layers = max(1, (3 * n) // 4)
        if not isinstance(self.min_layers, int) or not 1 <= self.min_layers <= n:
            raise SlimLMError(f"skipdecode min_layers {self.min_layers} is outside the model: it must be in 1..{n}")
        self.num_layers = n

    def skipped(self, g: int) -> int:
        """Lower layers a token with generated index ``g`` skips (non-decreasing in g)."""
        return round((self.num_layers - self.min_layers) * min(max(g, 0), self.ramp) / self.ramp)

    def release(self, seq_id: int) -> None:
        self.prompt_len.pop(seq_id, None)

    def begin_step(self, info: StepInfo) -> None:
        self._skip = None
        if info.row_output is None or not bool(info.row_output.any()):
            return
        gen = info.row_output.nonzero()[:, 0]
        seqs, pos = info.row_seq[gen].tolist(), info.positions[gen].tolist()
        first: dict[int, int] = {}
        for s, p in zip(seqs, pos):
            first[s] = min(first.get(s, p), p)
        for s, p in first.items():
            self.prompt_len.setdefault(s, p)  # the first generated row seen is at the prompt's length
        skip = torch.zeros(info.positions.shape[0], dtype=torch.long)
        for r, s, p in zip(gen.tolist(), seqs, pos):
            skip[r] = self.skipped(p - self.prompt_len[s])
        n = int(skip.sum())
        self.counts["layers_skipped"] += n
        self.counts["layers_run"] += len(gen) * self.num_layers - n
        self._skip = skip.to(info.positions.device) if n else None

    def bypass(self, layer: int, info: StepInfo) -> torch.Tensor | None:
        if self._skip is None:
            return None
        rows = (self._skip > layer).nonzero()[:, 0]
        return rows if rows.numel() else None
