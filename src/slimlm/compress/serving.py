"""Serve compressed structures as they were trained: low-rank (PELA) factors and Compacter adapters.

``slimlm.model.hub.load`` calls :func:`restore` on every Hugging Face directory it loads; it
changes nothing unless the directory holds one of these files:

- ``lowrank.json`` (+ ``lowrank/factors.safetensors``), written by ``slimlm lowrank`` and by PELA recovery
  (``slimlm distill`` with ``distill.lowrank``): the factored layers are rebuilt as
  ``LowRankLinear(down, up)`` from the stored factors (older folders without the factors: the
  exact rank-r SVD of the stored product), so the engine computes x -> down -> up, the cheaper
  r (in + out) multiply-adds per token, and its logits equal the trained low-rank model's.
  ``model.safetensors`` still holds the dense products, so transformers (and any other tool)
  loads the same function densely.
- ``compacter.json`` + ``compacter/adapters.safetensors``, written by ``slimlm finetune --method compacter``
  into ``out_dir/compacter``: next to the frozen base weights, the adapters (nonlinear, so they
  cannot be merged into the weights) are attached again and loaded, and the engine serves the
  adapted model. transformers loads that folder as the base model without the adapters.

Packed (int8/int4/GGUF) weights are not restructured: a quantised load of such a folder is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimlm.errors import ModelLoadError
from slimlm.model.transformer import CausalLM

from slimlm.compress.lowrank import LOWRANK_FILE

LOWRANK_FACTORS = "lowrank/factors.safetensors"  # in a subfolder: a model folder's *.safetensors are its weights
COMPACTER_FILE = "compacter.json"
COMPACTER_WEIGHTS = "compacter/adapters.safetensors"


def structured(path: Path) -> str | None:
    if (path / LOWRANK_FILE).is_file():
        return "low-rank"
    if (path / COMPACTER_FILE).is_file():
        return "compacter"
    return None


def restore(model: CausalLM, path: Path, packed: bool) -> CausalLM:
    """Rebuild low-rank factors or Compacter adapters named by files in ``path`` (else unchanged)."""
    kind = structured(path)
    if kind is None:
        return model
    if packed:
        raise ModelLoadError(f"{path} holds a {kind} model; it loads with dense weights only (not int8/int4)")
    dtype, device = model.dtype, model.device
    if kind == "low-rank":
        restore_lowrank(model, path)
    else:
        restore_compacter(model, path)
    return model.to(device=device, dtype=dtype)


@torch.no_grad()
def restore_lowrank(model: CausalLM, path: Path) -> dict[str, int]:
    from slimlm.compress.lowrank import LowRankLinear, refactor

    if not (path / LOWRANK_FACTORS).is_file():
        return refactor(model, path)
    ranks = json.loads((path / LOWRANK_FILE).read_text())["ranks"]
    factors = load_file(str(path / LOWRANK_FACTORS))
    modules = dict(model.named_modules())
    for name, r in ranks.items():
        parent_name, attr = name.rsplit(".", 1)
        lin = getattr(modules[parent_name], attr)
        down, up = factors[f"{name}.down"], factors[f"{name}.up"]
        if down.shape != (int(r), lin.in_features) or up.shape != (lin.out_features, int(r)):
            raise ModelLoadError(f"{path}: factors of {name} do not match its rank {r} and shape")
        bias = None if lin.bias is None else lin.bias.detach().clone()
        setattr(modules[parent_name], attr, LowRankLinear(down.to(lin.weight.dtype), up.to(lin.weight.dtype), bias))
    return ranks


def lowrank_factors(model: CausalLM) -> dict[str, torch.Tensor]:
    from slimlm.compress.lowrank import LowRankLinear

    state = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            state[f"{name}.down"] = m.down.detach().float().contiguous().cpu()
            state[f"{name}.up"] = m.up.detach().float().contiguous().cpu()
    return state


def save_lowrank_factors(state: dict[str, torch.Tensor], path: Path) -> None:
    (path / LOWRANK_FACTORS).parent.mkdir(exist_ok=True)
    save_file(state, str(path / LOWRANK_FACTORS), metadata={"format": "pt"})


@torch.no_grad()
def restore_compacter(model: CausalLM, path: Path) -> None:
    from slimlm.compress.adapters.base import METHODS, FinetuneConfig

    meta = json.loads((path / COMPACTER_FILE).read_text())
    METHODS.get("compacter")(FinetuneConfig(method="compacter", n=int(meta["n"]), bottleneck=int(meta["bottleneck"]),
                                            rank=int(meta["rank"]))).apply(model)
    state = load_file(str(path / COMPACTER_WEIGHTS))
    own = dict(model.named_parameters())
    adapter = {k for k, p in own.items() if p.requires_grad}
    if set(state) != adapter:
        raise ModelLoadError(f"{path}: {COMPACTER_WEIGHTS} does not match a Compacter with {meta}")
    for k, v in state.items():
        own[k].copy_(v)
    for p in model.parameters():
        p.requires_grad_(False)
