"""The layer-plan extension point: hooks that decide, per step and per layer, which rows run.

The runner calls every registered hook before each decoder layer. A hook sees the step
(:class:`StepInfo`: each row's position, sequence and whether it is a prompt or a generated
token, the chunks, the rows whose logits are needed) and the hidden states, and may return a
:class:`~slimlm.model.transformer.RowPlan`: the rows that keep running (the others leave the
step at this layer: their hidden state is carried up and their keys/values are still written
in the later layers) and the rows that run the MLP. Rows that left never come back within the
step; rows whose logits are needed never leave. ``restage`` is the wider seam: a hook may
append rows that enter the step at a layer and give the attention backend for the layers
above (LazyLLM's deferred and revived tokens, whose KV is absent where they did not run).
Hooks may keep per-sequence state (keyed by ``StepInfo.row_seq``) and drop it in ``release``.

How to add one: subclass :class:`LayerHook` in a new file of this folder, register it with
``@LAYER_HOOKS.register("name")``, import it in ``__init__.py``; the parametrized test in
tests/engine/test_hooks.py runs every registered hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.model.transformer import CausalLM, RowPlan
from slimlm.registry import Registry


@dataclass
class Segment:
    """One chunk of the step: rows [start, end) of sequence ``seq_id``."""

    seq_id: int
    start: int
    end: int
    prefill: bool
    """All rows are prompt tokens (a prefill chunk)."""
    prompt_len: int = 0
    """The sequence's prompt length (rows at positions >= it hold generated tokens)."""
    block_table: list[int] | None = None
    """The sequence's physical block per logical block (storage index = position unless a
    token policy compacted it)."""


@dataclass
class StepInfo:
    positions: torch.Tensor
    """(T,) position of each row of the step."""
    num_decode_rows: int
    """Rows [0, num_decode_rows) are single-token chunks."""
    row_seq: torch.Tensor | None = None
    """(T,) sequence id of each row."""
    row_output: torch.Tensor | None = None
    """(T,) bool: the row holds a generated token (its position is past the prompt), whatever
    chunk it came in (decode, verification, or recompute after preemption)."""
    logit_rows: torch.Tensor | None = None
    """(R,) rows whose logits the step needs: they run every layer."""
    segments: tuple[Segment, ...] = ()


@dataclass
class Stage:
    """What the layers above ``layer`` run on (see :meth:`LayerHook.restage`): the step's rows
    (the runner's rows first, in their order; a hook may append rows that enter here), their
    RoPE tables, the attention backend serving them, the step info extended to them, and the
    rows still running (None = all)."""

    h: torch.Tensor  # (1, T, D)
    cos: torch.Tensor  # (1, T, d)
    sin: torch.Tensor
    attn: object
    info: StepInfo
    active: torch.Tensor | None


class LayerHook:
    prefix_exact: ClassVar[bool] = True
    """Whether the KV a sequence computes stays a function of its tokens alone. A hook whose
    plan depends on more (LazyLLM ranks a prompt's tokens against its last one; FFN skipping
    treats prompt and generated tokens differently) sets False, and the engine then shares no
    prefix blocks, since another request's cached prefix would differ from its own."""

    with_kv_policy: ClassVar[bool] = True
    """Whether the hook composes with a KV policy (False: the engine refuses the pair)."""

    def bind(self, model: CausalLM) -> None:
        """Called once when the engine starts, with the model the hook will see."""

    def begin_step(self, info: StepInfo) -> None:
        """Called once per step before the first layer."""

    def before_layer(self, layer: int, h: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """h: (1, T, D). Return the hidden states the layer should see."""
        return h

    def restage(self, layer: int, stage: Stage) -> Stage | None:
        """Called before ``layer``'s plan. Return a new :class:`Stage` to change the rows the
        step runs from this layer on: append rows that enter here from a saved hidden state
        (LazyLLM's revival; they write KV only at the layers they run) and give an attention
        backend whose writes skip rows that left (their KV at the layers above stays absent,
        masked by that backend). None = no change."""
        return None

    def fork(self, parent: int, child: int) -> None:
        """A parallel sample ``child`` was forked from ``parent`` (n > 1) after the prompt:
        copy any per-sequence state the child needs."""

    def plan(self, layer: int, h: torch.Tensor, info: StepInfo, active: torch.Tensor | None) -> RowPlan | None:
        """Rows that run ``layer``: ``active`` (None = all) are the rows still running. Return
        None to change nothing."""
        return None

    def bypass(self, layer: int, info: StepInfo) -> torch.Tensor | None:
        """Rows that skip ``layer`` entirely and run the layers above it (SkipDecode skips the
        lower layers). Unlike rows that leave, they come back; their keys and values at
        ``layer`` are written from the state they carry (or not at all when no row runs the
        layer), so a hook that bypasses must only do so where no later query reads them.
        Rows whose logits are needed may bypass. None = no row."""
        return None

    def release(self, seq_id: int) -> None:
        """The sequence finished (or was aborted): drop any state kept for it. A preempted
        sequence is not released: it keeps its state and is recomputed from its first token, so
        a hook whose state describes the KV must notice the restart (LazyLLM does in
        ``begin_step`` when a chunk starts at 0); decisions kept by position (FFN-skip's) stay
        valid, which is what keeps output unchanged under preemption."""


LAYER_HOOKS: Registry[LayerHook] = Registry("layer hook")


def combine_plans(plans: list[RowPlan], active: torch.Tensor | None, keep: torch.Tensor | None,
                  num_rows: int) -> RowPlan | None:
    """One plan from several hooks' plans: a row runs if every hook lets it; rows in ``keep``
    (those whose logits are needed) always run."""
    if not plans and active is None:
        return None
    device = keep.device if keep is not None else None
    run = torch.ones(num_rows, dtype=torch.bool, device=device) if active is None else _mask(active, num_rows)
    mlp = None
    for p in plans:
        if p.q_rows is not None:
            run &= _mask(p.q_rows, num_rows)
        if p.mlp_rows is not None:
            m = _mask(p.mlp_rows, num_rows)
            mlp = m if mlp is None else mlp & m
    if keep is not None:
        run[keep] = True  # they never left: plans are combined the same way at every layer
    q_rows = None if bool(run.all()) else run.nonzero()[:, 0]
    mlp_rows = None if mlp is None else (mlp & run).nonzero()[:, 0]
    if q_rows is None and mlp_rows is None:
        return None
    return RowPlan(q_rows, mlp_rows)


def bypass_plan(hooks: list[LayerHook], layer: int, info: StepInfo, plan: RowPlan | None,
                num_rows: int) -> tuple[bool, RowPlan | None]:
    """(whether any row runs ``layer``, the layer's plan) after the hooks' bypassed rows are
    taken out of ``plan`` for this layer only."""
    byp = [b for b in (hk.bypass(layer, info) for hk in hooks) if b is not None and b.numel()]
    if not byp:
        return True, plan
    dev = byp[0].device
    run = torch.ones(num_rows, dtype=torch.bool, device=dev) if plan is None or plan.q_rows is None \
        else _mask(plan.q_rows, num_rows)
    mlp = run.clone() if plan is None or plan.mlp_rows is None else _mask(plan.mlp_rows, num_rows)
    for b in byp:
        run[b] = False
    if not bool(run.any()):
        return False, None
    return True, RowPlan(run.nonzero()[:, 0], (mlp & run).nonzero()[:, 0])


def _mask(rows: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=rows.device)
    m[rows] = True
    return m
