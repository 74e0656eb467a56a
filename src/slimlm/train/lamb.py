"""LAMB: layer-wise adaptive moments for large-batch training (You et al., 2020, Algorithm 2).

For each parameter tensor x with gradient g at update t (1-based):

    m = beta1 m + (1 - beta1) g                    v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t)                      v_hat = v / (1 - beta2^t)      (bias correction)
    r = m_hat / (sqrt(v_hat) + eps)                u = r + lambda x               (decoupled decay)
    x = x - lr * phi(||x||) / ||u|| * u            phi(z) = min(z, max_trust), trust = 1 if ||x|| or ||u|| is 0

The trust ratio ||x|| / ||u|| scales each layer's step to its weight norm.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class Lamb(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_trust: float = 10.0,
    ):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust=max_trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for x in group["params"]:
                if x.grad is None:
                    continue
                g = x.grad.float()
                state = self.state[x]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(x, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(x, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                w = x.float()
                u = r + group["weight_decay"] * w if group["weight_decay"] else r
                w_norm, u_norm = w.norm(), u.norm()
                trust = torch.where(
                    (w_norm > 0) & (u_norm > 0), w_norm.clamp(max=group["max_trust"]) / u_norm, torch.ones_like(w_norm)
                )
                x.add_((u * (-group["lr"] * trust)).to(x.dtype))
        return loss
