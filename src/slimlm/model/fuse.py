"""Fused projections for serving: q, k and v as one matmul, gate and up as one.

A decode step of a small model is many small matrix-vector products; each one is a separate
operator call and, on the CPU, a separate OpenMP parallel region with its own barrier. Reading
the same weights through one call per group saves 3 of the 7 calls per layer.

The fused weight is one new tensor; the original modules' weights become *views* into it, so
nothing is held twice and every module keeps its Hugging Face name and still works on its own
(row plans that query only some rows call ``q_proj`` alone, hooks read ``k_proj``). The fused
module is not registered as a sub-module: ``state_dict``, ``parameters()`` and checkpoints are
unchanged. A layer uses the fused path only while its first projection still reads the fused
storage (``fused_ok``): moving the model with ``.to()`` or replacing a projection afterwards
makes it fall back to the separate calls instead of using stale weights.

Dense ``nn.Linear`` groups and packed ``QuantLinear`` groups of one kind and group size fuse
(packed rows are per output channel, so concatenating rows concatenates outputs); anything else
(adapters, low-rank factors, mixed kinds) is left as it is. ``SLIMLM_FUSE=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from slimlm.model.quant.linear import QuantLinear


def _anchor(m: nn.Module) -> torch.Tensor:
    return m.qweight if isinstance(m, QuantLinear) else m.weight


def fused_ok(fused: nn.Module | None, first: nn.Module) -> bool:
    """True when ``fused`` (built by :func:`fuse`) still reads ``first``'s weights."""
    return fused is not None and _anchor(fused).data_ptr() == _anchor(first).data_ptr()


def fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)``, the originals re-pointed at views
    of its storage; None when the group cannot be fused."""
    if all(type(m) is nn.Linear for m in mods):
        w = [m.weight for m in mods]
        if len({(t.dtype, t.device, t.shape[1]) for t in w}) != 1 or len({m.bias is None for m in mods}) != 1:
            return None
        out = nn.Linear(w[0].shape[1], sum(t.shape[0] for t in w), bias=mods[0].bias is not None,
                        device="meta")
        out.weight = nn.Parameter(torch.cat([t.detach() for t in w]), requires_grad=False)
        if mods[0].bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        names = ["weight", "bias"] if mods[0].bias is not None else ["weight"]
        _repoint(mods, out, names, lambda m: m.weight.shape[0], param=True)
        return out
    if all(type(m) is QuantLinear for m in mods):
        keys = {(m.kind, m.group_size, m.in_features, m.qweight.device, m.bias is None) for m in mods}
        if len(keys) != 1:
            return None
        packed = [m.packed().tensors() for m in mods]
        cls = type(mods[0].packed())
        tensors = {k: torch.cat([p[k] for p in packed]) for k in packed[0]}
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        out = QuantLinear(_from_tensors(cls, tensors, mods[0].group_size), bias)
        out.native = mods[0].native
        names = list(tensors) + (["bias"] if bias is not None else [])
        _repoint(mods, out, names, lambda m: m.out_features, param=False)
        return out
    return None


def _from_tensors(cls, tensors: dict[str, torch.Tensor], group_size: int):
    from slimlm.model.quant.formats import Int4Weight, Int8Weight

    if cls is Int8Weight:
        return Int8Weight(tensors["qweight"], tensors["scales"], group_size)
    if cls is Int4Weight:
        return Int4Weight(tensors["qweight"], tensors["scales"], tensors["mins"], group_size)
    raise TypeError(f"cannot fuse packed weights of type {cls.__name__}")


def _repoint(mods: list[nn.Module], fused: nn.Module, names: list[str], rows, param: bool) -> None:
    """Make each original module's tensors row slices (views) of the fused module's."""
    start = 0
    for m in mods:
        n = rows(m)
        for name in names:
            view = getattr(fused, name)[start:start + n]
            if name == "bias" or param:
                setattr(m, name, nn.Parameter(view, requires_grad=False))
            else:
                setattr(m, name, view)  # a registered buffer: assignment replaces it
        start += n


def fuse_projections(model: nn.Module) -> int:
    """Fuse every decoder layer's q/k/v and gate/up projections in place (for serving; the
    model is not meant to be trained afterwards). Returns the number of fused groups."""
    if os.environ.get("SLIMLM_FUSE", "1") == "0":
        return 0
    n = 0
    for layer in model.model.layers:
        a = layer.self_attn
        if getattr(a, "qkv", None) is None:
            qkv = fuse([a.q_proj, a.k_proj, a.v_proj])
            if qkv is not None:
                object.__setattr__(a, "qkv", qkv)  # not a sub-module: see the module docstring
                n += 1
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj") and getattr(mlp, "gate_up", None) is None:
            gu = fuse([mlp.gate_proj, mlp.up_proj])
            if gu is not None:
                object.__setattr__(mlp, "gate_up", gu)
                n += 1
    return n
