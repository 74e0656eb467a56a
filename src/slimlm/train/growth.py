"""Model growth: make a deeper model from a trained smaller one, then keep training it.

Du et al., 2024, "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
Pre-Training": of the growth operators they compare, depth-wise stacking (G_stack) is the one
that scales: the grown model of g * L layers is the small model's L layers repeated g times,

    layers = [1, 2, ..., L, 1, 2, ..., L, ...]      (g copies, each with the trained weights)

embeddings, final norm and head are kept. At initialization the grown model computes exactly
the small model's layer stack applied g times in a row (tested). How to add an operator: a
function ``(num_layers_small, num_layers_grown) -> source layer of each grown layer`` registered
with ``@GROWTH_OPERATORS.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM
from slimlm.registry import Registry

LayerMap = Callable[[int, int], list[int]]
GROWTH_OPERATORS: Registry[LayerMap] = Registry("growth operator")


@GROWTH_OPERATORS.register("stack")
def stack(small: int, grown: int) -> list[int]:
    """G_stack: the whole stack repeated (Du et al., 2024, Sec. 3)."""
    return [i % small for i in range(grown)]


@GROWTH_OPERATORS.register("interleave")
def interleave(small: int, grown: int) -> list[int]:
    """Each layer repeated in place, [1, 1, 2, 2, ...] (the 'layer duplication' variant, for comparison)."""
    return [i * small // grown for i in range(grown)]


def grown_layers(small: int, factor: float) -> int:
    """Layer count of the grown model; a factor that does not give a whole number is a config error."""
    n = small * factor
    if factor < 1 or abs(n - round(n)) > 1e-9:
        raise SlimLMError(f"model.growth.factor {factor:g} gives {n:g} layers from {small}; it must be >= 1 "
                          f"and give a whole number of layers (e.g. {', '.join(f'{k / small:g}' for k in (2 * small, 3 * small))})")
    return int(round(n))


def grow(model: CausalLM, operator: str, factor: float) -> CausalLM:
    """A new, deeper model whose layer i has the weights of ``model``'s layer ``map[i]``."""
    layer_map = GROWTH_OPERATORS.get(operator)
    n = grown_layers(model.cfg.num_layers, factor)
    big = CausalLM(model.cfg.replace(num_layers=n))
    src = layer_map(model.cfg.num_layers, n)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            continue
        state[k] = v.clone()
    for i, j in enumerate(src):
        for k, v in model.model.layers[j].state_dict().items():
            state[f"model.layers.{i}.{k}"] = v.clone()
    with torch.no_grad():
        big.load_state_dict(state, strict=True)
    return big.to(model.dtype)
