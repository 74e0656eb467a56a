"""Optimizers by name. Weight decay applies to matrices only, not to norms and biases
(as in GPT-2/3 and Llama training).

How to add an optimizer: a function ``(groups, cfg) -> torch.optim.Optimizer`` decorated with
``@OPTIMIZERS.register("name")``; its learning rate is overwritten by the schedule every update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimlm.train.config import OptimConfig
from slimlm.train.lamb import Lamb
from slimlm.registry import Registry

OptimizerFactory = Callable[[list[dict[str, Any]], OptimConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay."""
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


@OPTIMIZERS.register("lamb")
def lamb(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """LAMB (You et al., 2020): Adam moments with a per-layer trust ratio, for large batches."""
    return Lamb(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(param_groups(model, cfg.weight_decay), cfg)
