"""FFN skipping for generated tokens: static layers, or adaptive per sequence (FFN-SkipLLM).

Static (``layers=[...]``): generated tokens skip the MLP of the chosen layers — the baseline
that FFN-SkipLLM (Jaiswal et al. 2024) improves on.

Adaptive (``adaptive=True``), after FFN-SkipLLM: the first ``probe`` generated tokens of each
sequence run every MLP, and at every middle layer the cosine similarity of the hidden state
before and after the FFN block (residual included) is measured. FFN blocks that barely turn
the hidden state ("saturated": mean similarity above ``threshold``) are skipped for the rest
of that sequence's tokens; the first ``keep_first`` and the last ``keep_last`` layers always
run, and at most ``max_skip`` of the middle layers are skipped (the most saturated first).
The measurement is exact: for a probe row the hook lets the layer run without its MLP, then
runs the MLP itself on the row at the next layer's entry, measures, and puts the result back.

Rows are told apart by position (a generated token is past the prompt), not by chunk shape,
so the output does not depend on chunk boundaries or recomputation after preemption (the
per-sequence decision survives preemption; it is dropped when the sequence finishes). Lossy;
off by default. ``counts`` holds the MLP evaluations of generated rows run and skipped (the
FLOPs saved follow from them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.engine.hooks.base import LAYER_HOOKS, LayerHook, StepInfo
from slimlm.model.transformer import CausalLM, RowPlan


@LAYER_HOOKS.register("ffn_skip")
@dataclass
class FFNSkip(LayerHook):
    prefix_exact = False

    layers: list[int] = field(default_factory=list)
    """Static: layers whose MLP generated tokens skip."""
    adaptive: bool = False
    """FFN-SkipLLM: choose the skipped layers per sequence from its first generated tokens."""
    threshold: float = 0.95
    """Adaptive: skip an FFN block whose before/after cosine similarity (mean over the probe
    tokens) is above this, in (0, 1]."""
    probe: int = 4
    """Adaptive: generated tokens per sequence that run every FFN and are measured."""
    keep_first: int = 3
    """Adaptive: first layers that always run their FFN."""
    keep_last: int = 3
    """Adaptive: last layers that always run their FFN (at least 1)."""
    max_skip: float = 0.5
    """Adaptive: most of the middle layers skipped per sequence, as a fraction in [0, 1]."""

    def __post_init__(self) -> None:
        if self.adaptive and self.layers:
            raise ValueError("ffn_skip: give either static layers or adaptive=True, not both")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"ffn_skip threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= float(self.max_skip) <= 1.0:
            raise ValueError(f"ffn_skip max_skip must be in [0, 1], got {self.max_skip}")
        if self.probe < 1 or self.keep_first < 0 or self.keep_last < 1:
            raise ValueError(f"ffn_skip needs probe >= 1, keep_first >= 0 and keep_last >= 1, got probe={self.probe}, "
                             f"keep_first={self.keep_first}, keep_last={self.keep_last}")
        self.counts = {"mlp_run": 0, "mlp_skipped": 0}
        self._reset_state()

    def _reset_state(self) -> None:
        self.prompt_len: dict[int, int] = {}
        self.sums: dict[int, torch.Tensor] = {}  # seq -> (L,) summed cosine over probe tokens
        self.seen: dict[int, set[int]] = {}  # seq -> generated indices measured
        self.skip: dict[int, list[int]] = {}  # seq -> decided layers
        self._probe_rows: torch.Tensor | None = None
        self._skip_mask: torch.Tensor | None = None  # (T, L)
        self._measure: tuple[int, torch.Tensor] | None = None

    def bind(self, model: CausalLM) -> None:
        n = model.cfg.num_layers
        for i in self.layers:
            if not 0 <= i < n:
                raise ValueError(f"ffn_skip layer {i} is outside the model's layers 0..{n - 1}")
        if self.adaptive and self.keep_first + self.keep_last >= n:
            raise ValueError(f"ffn_skip keeps {self.keep_first} first + {self.keep_last} last layers: nothing is left "
                             f"to skip in a model of {n} layers")
        self.model, self.num_layers = model, n
        self.middle = list(range(self.keep_first, n - self.keep_last))

    def release(self, seq_id: int) -> None:
        for d in (self.prompt_len, self.sums, self.seen, self.skip):
            d.pop(seq_id, None)

    # ------------------------------------------------------------------ per step
    def begin_step(self, info: StepInfo) -> None:
        self._probe_rows, self._skip_mask, self._measure = None, None, None
        if info.row_output is None or not bool(info.row_output.any()):
            return
        gen = info.row_output.nonzero()[:, 0]
        seqs, pos = info.row_seq[gen].tolist(), info.positions[gen].tolist()
        if not self.adaptive:
            self.counts["mlp_skipped"] += len(gen) * len(self.layers)
            self.counts["mlp_run"] += len(gen) * (self.num_layers - len(self.layers))
            return
        first: dict[int, int] = {}
        for s, p in zip(seqs, pos):
            first[s] = min(first.get(s, p), p)
        for s, p in first.items():
            self.prompt_len.setdefault(s, p)  # the first generated row seen is at the prompt's length
        for s in first:
            if s not in self.skip and len(self.seen.get(s, ())) >= self.probe:
                self._decide(s)
        T = info.positions.shape[0]
        mask = torch.zeros(T, self.num_layers, dtype=torch.bool)
        probe = []
        for r, s, p in zip(gen.tolist(), seqs, pos):
            g = p - self.prompt_len[s]
            if s in self.skip:
                if g >= self.probe and self.skip[s]:
                    mask[r, self.skip[s]] = True
            elif g < self.probe:
                probe.append(r)
        n_skip = int(mask.sum())
        self.counts["mlp_skipped"] += n_skip
        self.counts["mlp_run"] += len(gen) * self.num_layers - n_skip
        dev = info.positions.device
        self._skip_mask = mask.to(dev) if n_skip else None
        self._probe_rows = torch.tensor(probe, dtype=torch.long, device=dev) if probe else None

    def _decide(self, s: int) -> None:
        mean = self.sums[s] / max(len(self.seen[s]), 1)
        cand = [i for i in self.middle if float(mean[i]) > self.threshold]
        cand.sort(key=lambda i: -float(mean[i]))
        self.skip[s] = sorted(cand[: int(self.max_skip * len(self.middle))])

    def before_layer(self, layer: int, h: torch.Tensor, info: StepInfo) -> torch.Tensor:
        if self._measure is None or self._measure[0] != layer - 1:
            return h
        prev, rows = self._measure
        self._measure = None
        x = h[:, rows]  # (1, R, D): the rows' state after attention, before the FFN
        y = self.model.model.layers[prev].mlp_block(x)
        cos = torch.nn.functional.cosine_similarity(x[0].float(), y[0].float(), dim=-1)  # (R,)
        for r, c in zip(rows.tolist(), cos.tolist()):
            s = int(info.row_seq[r])
            g = int(info.positions[r]) - self.prompt_len[s]
            self.sums.setdefault(s, torch.zeros(self.num_layers))[prev] += c
            if prev == self.middle[0]:
                self.seen.setdefault(s, set()).add(g)
        return h.index_copy(1, rows, y)

    def plan(self, layer: int, h: torch.Tensor, info: StepInfo, active: torch.Tensor | None) -> RowPlan | None:
        if not self.adaptive:
            if layer not in self.layers or info.row_output is None or not bool(info.row_output.any()):
                return None
            return RowPlan(mlp_rows=(~info.row_output).nonzero()[:, 0])
        T = h.shape[1]
        off = torch.zeros(T, dtype=torch.bool, device=h.device)
        if self._skip_mask is not None:
            off |= self._skip_mask[:, layer]
        if self._probe_rows is not None and layer in self.middle:
            rows = self._probe_rows
            if active is not None:
                rows = rows[torch.isin(rows, active)]
            if rows.numel():
                off[rows] = True
                self._measure = (layer, rows)
        if not bool(off.any()):
            return None
        return RowPlan(mlp_rows=(~off).nonzero()[:, 0])
