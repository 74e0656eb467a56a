"""Optimizers by name. Weight decay applies to matrices only, not to norms and biases
(as in GPT-2/3 and Llama training).

How to add an optimizer: a function ``(groups, cfg) -> torch.optim.Optimizer`` decorated with
``@OPTIMIZERS.register("name")``; its learning rate is overwritten by the schedule every update.
Add its name to ``LOWRANK`` if it wants the decoder layers' matrices in their own group marked
``lowrank`` (GaLore-style projection; embeddings, head and norms stay full-rank, as in GaLore).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimlm.model import mup
from slimlm.model.config import ModelConfig
from slimlm.train.config import OptimConfig
from slimlm.train.galore import GaLoreAdamW, check_rank
from slimlm.train.gradnorm_lorp import GradNormLoRP
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


def lowrank_targets(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The decoder layers' matrices (attention and MLP projections, not MoE routers), by name."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and "layers." in n and not n.endswith("mlp.gate.weight")]


def lowrank_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[layer matrices (lowrank), other matrices, vectors (no decay)]."""
    targets = lowrank_targets(model)
    ids = {id(p) for _, p in targets}
    rest = param_groups(model, weight_decay)
    rest[0]["params"] = [p for p in rest[0]["params"] if id(p) not in ids]
    return [{"params": [p for _, p in targets], "weight_decay": weight_decay, "lowrank": True}, *rest]


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay."""
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


@OPTIMIZERS.register("lamb")
def lamb(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """LAMB (You et al., 2020): Adam moments with a per-layer trust ratio, for large batches."""
    return Lamb(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps)


@OPTIMIZERS.register("galore")
def galore(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """GaLore (Zhao et al., 2024): AdamW with the layer matrices' state in a rank-r gradient subspace."""
    g = cfg.galore
    return GaLoreAdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, rank=g.rank,
                       update_proj_gap=g.update_proj_gap, scale=g.scale, proj_type=g.proj_type)


@OPTIMIZERS.register("gradnorm_lorp")
def gradnorm_lorp(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """GradNormLoRP (Huang et al., 2024): weight-normalized matrices, GaLore on the direction's gradient."""
    g = cfg.galore
    return GradNormLoRP(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, rank=g.rank,
                        update_proj_gap=g.update_proj_gap, scale=g.scale, proj_type=g.proj_type)


LOWRANK = {"galore", "gradnorm_lorp"}


def build_optimizer(model: nn.Module, cfg: OptimConfig, model_cfg: ModelConfig | None = None) -> torch.optim.Optimizer:
    """Groups for ``cfg.name``; with a μP ``model_cfg`` each group is split by lr multiplier
    (``lr_mult``: the trainer sets lr = schedule lr x lr_mult)."""
    factory = OPTIMIZERS.get(cfg.name)
    if cfg.name in LOWRANK:
        check_rank(lowrank_targets(model), cfg.galore.rank)
        groups = lowrank_groups(model, cfg.weight_decay)
    else:
        groups = param_groups(model, cfg.weight_decay)
    if model_cfg is not None:
        groups = mup.split_lr_groups(groups, list(model.named_parameters()), model_cfg)
    return factory(groups, cfg)
