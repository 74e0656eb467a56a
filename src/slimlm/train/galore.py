"""GaLore: Adam whose state for each layer matrix lives in a rank-r subspace of its gradient.

Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
Algorithm 1. For a matrix W (m, n) with gradient G:

    every T updates:  U, S, Vh = svd(G);  P = Vh[:r] (r, n) if m >= n else U[:, :r] (m, r)
    R = G P^T (m, r)      or  P^T G (r, n)              project          ('std': the smaller side)
    M, V = Adam moments of R;  N = M_hat / (sqrt(V_hat) + eps)            in the subspace
    W -= lr * alpha * (N P  or  P N)                                       project back, scale alpha
    W -= lr * weight_decay * W                                             decoupled, after the step

Matrices outside the ``lowrank`` parameter group take the same Adam step unprojected. The state
is tensors only (moments, projector P, step), so checkpoints stay ``weights_only`` and resume
step-exactly. Data parallel: under DDP every rank holds the same all-reduced gradient, so every
rank computes the same SVD. Under FSDP2 a matrix's gradient is sharded by rows: the full gradient
is gathered for the projection (GaLore needs its SVD), the low-rank state is kept replicated, and
each rank applies its own rows of the projected-back update (the public implementation supports
neither).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slimlm.errors import SlimLMError

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment]


def projects_right(shape: torch.Size, proj_type: str) -> bool:
    """True: R = G P^T with P (r, n); False: R = P^T G with P (m, r)."""
    m, n = shape
    return proj_type == "right" or (proj_type == "std" and m >= n)


def projector(g: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """The top-``rank`` singular directions of ``g`` on one side: (r, n) if right else (m, r)."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return (vh[:rank] if right else u[:, :rank]).to(g.dtype)


def check_rank(named: list[tuple[str, torch.Tensor]], rank: int) -> None:
    """A rank above a matrix's smaller dimension is a config error, reported before any step."""
    for name, p in named:
        if rank > min(p.shape):
            raise SlimLMError(
                f"optim.galore.rank {rank} is larger than a dimension of {name} ({p.shape[0]} x {p.shape[1]}); "
                f"valid: 1 to {min(min(q.shape) for _, q in named)} for this model")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full-size update shaped like ``p``: its local shard when ``p`` is an FSDP2 DTensor."""
    if isinstance(p, DTensor):
        return distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
    return update


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for the groups marked ``lowrank``."""

    def __init__(self, groups: list[dict[str, Any]], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, lowrank=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["lowrank"]:
                    self._lowrank_step(p, group)
                else:
                    update, step_size = self._adam(self.state[p], p.grad, group)
                    p.add_(update, alpha=-step_size)
                    self._decay(p, group)

    # ---------------------------------------------------------------- pieces
    @staticmethod
    def _adam(state: dict[str, torch.Tensor], g: torch.Tensor, group: dict[str, Any],
              prefix: str = "") -> tuple[torch.Tensor, float]:
        """Adam for gradient ``g``: (M / (sqrt(V) + eps), lr * sqrt(1 - b2^t) / (1 - b1^t)), the update
        being their product (GaLore's and HF AdamW's form of the bias correction); advances the step.
        ``prefix`` keeps a second set of moments in the same state (GradNormLoRP's norms)."""
        if prefix + "exp_avg" not in state:
            state[prefix + "step"] = torch.zeros((), dtype=torch.float32)
            state[prefix + "exp_avg"], state[prefix + "exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
        b1, b2 = group["betas"]
        state[prefix + "step"] += 1
        t = float(state[prefix + "step"])
        m, v = state[prefix + "exp_avg"], state[prefix + "exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        return m / v.sqrt().add_(group["eps"]), group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)

    def _project(self, state: dict[str, torch.Tensor], g: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """R = G P^T or P^T G; refreshes P every ``update_proj_gap`` updates (at step 0, T, 2T, ...)."""
        right = projects_right(g.shape, group["proj_type"])
        step = int(state["step"]) if "step" in state else 0
        if "proj" not in state or step % group["update_proj_gap"] == 0:
            state["proj"] = projector(g, group["rank"], right)
        return g @ state["proj"].T if right else state["proj"].T @ g

    def _lowrank_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state, g = self.state[p], full(p.grad)  # (m, n), gathered under FSDP2
        update, step_size = self._lowrank_update(state, g, group)  # (m, n)
        p.add_(like_param(update, p), alpha=-step_size)
        self._decay(p, group)

    def _lowrank_update(self, state: dict[str, torch.Tensor], g: torch.Tensor,
                        group: dict[str, Any]) -> tuple[torch.Tensor, float]:
        """(alpha * project_back(M / (sqrt(V) + eps)), Adam's step size) for gradient ``g``: the
        full-size update is their product."""
        right = projects_right(g.shape, group["proj_type"])
        r = self._project(state, g, group)  # (m, r) or (r, n)
        n, step_size = self._adam(state, r, group)
        return (n @ state["proj"] if right else state["proj"] @ n) * group["scale"], step_size  # (m, n)

    @staticmethod
    def _decay(p: torch.Tensor, group: dict[str, Any]) -> None:
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (this rank's shards under FSDP2)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if isinstance(v, DTensor) else v
                total += v.numel() * v.element_size()
    return total
