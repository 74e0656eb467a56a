"""Per-layer plans: hooks that decide which rows run each layer. One file per hook.

Importing this package registers every hook in ``LAYER_HOOKS``.
"""

from slimlm.engine.hooks.base import LAYER_HOOKS, LayerHook, Segment, Stage, StepInfo, bypass_plan, combine_plans
from slimlm.engine.hooks import ffn_skip, lazyllm, skipdecode  # noqa: F401  (register "ffn_skip", "lazyllm", "skipdecode")

__all__ = ["LAYER_HOOKS", "LayerHook", "Segment", "Stage", "StepInfo", "bypass_plan", "combine_plans"]
