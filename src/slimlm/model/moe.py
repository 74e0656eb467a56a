"""Mixture-of-experts MLP: a router picks top-k of E SwiGLU experts per token, plus optional
shared experts every token goes through (MiniCPM-MoE / Mixtral shape; DeepSeekMoE's shared experts).

    p = softmax(x W_router)                      (N, E)   router probabilities
    w, e = topk(p, k);  w = w / sum(w)           (N, k)   renormalised over the chosen experts
    y = sum_j w_j Expert_{e_j}(x) + Shared(x)

Batching is naive: one gather, expert MLP and scatter-add per expert (a loop over E), fine for a
few experts on CPU; no grouped GEMM. In training mode the layer keeps its router output
(``router_probs`` (N, E), ``router_choice`` (N, k)) for the load-balancing loss
(``slimlm.train.moe_balance``); in eval mode (serving) it keeps nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.model.config import ModelConfig


class MoEMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_cls: type[nn.Module]):
        super().__init__()
        inner = cfg.replace(intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size)
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(expert_cls(inner) for _ in range(cfg.num_experts))
        self.shared_experts = (expert_cls(inner.replace(intermediate_size=inner.intermediate_size * cfg.num_shared_experts))
                               if cfg.num_shared_experts else None)
        self.router_probs: torch.Tensor | None = None
        self.router_choice: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        probs = self.gate(flat).float().softmax(-1)  # (N, E)
        w, choice = probs.topk(self.top_k, dim=-1)  # (N, k)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (choice == e).nonzero(as_tuple=True)  # tokens routed to expert e
            if rows.numel() or self.training:  # training: every expert in the graph (DDP wants all grads)
                out.index_add_(0, rows, expert(flat[rows]) * w[rows, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.training:
            self.router_probs, self.router_choice = probs, choice
        return out.view(shape)
