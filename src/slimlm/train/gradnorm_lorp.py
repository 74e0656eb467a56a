"""GradNormLoRP: weight-normalized matrices with a GaLore step on the direction's gradient.

Huang et al., 2024, "Gradient Weight-normalized Low-rank Projection for Efficient LLM Training".
Each layer matrix is re-parameterized as W = g * V / ||V|| (weight normalization, Salimans &
Kingma, 2016, norms per output row): the gradient with respect to the direction is the
normalized gradient, projected on the unit-norm rows and rescaled, which is better conditioned
than G itself. With V kept at unit rows (re-normalized after every update, so no extra copy of
the weights is stored; the function of the model does not change):

    g = ||W||_row (m, 1),  D = W / g                          magnitude, direction
    dL/dg = sum_row(G * D),  dL/dV = g (G - D dL/dg)          weight-norm gradients (Salimans & Kingma, Eq. 3)
    V' = D - lr * GaLore(dL/dV)                               low-rank Adam on the normalized gradient
    g' = g - lr * Adam(dL/dg)                                 full Adam on the m norms (tiny state)
    W' = g' V' / ||V'||_row,  then decoupled weight decay

The state is GaLore's plus two moments of size m per matrix, so the memory saving is GaLore's.
"""

from __future__ import annotations

from typing import Any

import torch

from slimlm.train.galore import GaLoreAdamW, full, like_param


def weight_norm_grads(w: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, D, dL/dg, dL/dV) for W = g * V / ||V|| at V = D (unit rows); w, grad: (m, n)."""
    g = w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (m, 1)
    d = w / g  # (m, n)
    grad_g = (grad * d).sum(1, keepdim=True)  # (m, 1)
    return g, d, grad_g, g * (grad - d * grad_g)  # dL/dV: (m, n)


class GradNormLoRP(GaLoreAdamW):
    """GaLoreAdamW whose ``lowrank`` matrices are stepped in weight-normalized coordinates."""

    def _lowrank_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        g, d, grad_g, grad_v = weight_norm_grads(full(p.detach()), full(p.grad))
        update, step_size = self._lowrank_update(state, grad_v, group)
        v = d - step_size * update  # (m, n)
        update, step_size = self._adam(state, grad_g, group, prefix="norm_")
        g = g - step_size * update  # (m, 1)
        w = g * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        p.copy_(like_param(w.to(p.dtype), p))
        self._decay(p, group)
