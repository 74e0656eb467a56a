"""Quantize while loading: each tensor is packed as soon as it is read, so the fp32 model never
exists in full (resident memory follows the packed size)."""

from __future__ import annotations

import torch

from slimlm.model.quant.formats import PackedWeight
from slimlm.model.quant.model import HEAD_MODULES, check_weights, is_target, quantize_weight


class PackOnLoad:
    """``(key, tensor) -> state entries``: a target weight becomes its packed buffers
    (``qweight``, ``scales``[, ``mins``]); everything else passes unchanged. ``modules`` collects
    what was packed, for the config's ``quantization_config``."""

    def __init__(self, weights: str, group_size: int | None = None):
        self.weights = check_weights(weights, group_size)
        self.group_size = group_size
        self.modules: dict[str, list] = {}

    def wants(self, key: str, ndim: int) -> bool:
        mod, _, leaf = key.rpartition(".")
        return leaf == "weight" and ndim == 2 and (is_target(mod) or mod in HEAD_MODULES)

    def add(self, module: str, p: PackedWeight) -> dict[str, torch.Tensor]:
        self.modules[module] = [p.kind, p.group_size]
        return {f"{module}.{n}": t for n, t in p.tensors().items()}

    def __call__(self, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.weights not in ("int8", "int4") or not self.wants(key, t.ndim):
            return {key: t}
        mod = key.rpartition(".")[0]
        return self.add(mod, quantize_weight(mod, t, self.weights, self.group_size))

    def config(self) -> dict:
        return {"quant_method": "slimlm", "weights": self.weights, "modules": self.modules}
