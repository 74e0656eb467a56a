"""PELA (Guo et al., 2023): replace linear weights by low-rank factors, then recover by distillation.

    W (out, in) ~= U_r S_r V_r^T = up (out, r) @ down (r, in)       truncated SVD
    rank r: given (``rank``), or the smallest r keeping ``energy`` of sum(S^2)

Activation-aware (ASVD-style, optional): factor W diag(s) instead, s the mean |x| of each input
channel on calibration data, and fold diag(1/s) back into ``down``: the error is then weighted by
how strongly each input channel is used.

A layer is factored only if r (in + out) < in * out (otherwise it stays dense and is reported).
On disk the low-rank model is an ordinary HF directory holding the products (every tool loads
it; its quality is the low-rank model's) plus ``lowrank.json`` with each layer's rank;
:func:`refactor` rebuilds the exact factors from it (a rank-r matrix's SVD), so recovery
(``slimlm distill`` with ``[lowrank]`` in the config) trains the factors, not dense weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.compress.adapters.base import LINEARS
from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM

LOWRANK_FILE = "lowrank.json"


@dataclass
class LowRankConfig:
    rank: int | None = None
    """Rank kept in every factored layer."""
    energy: float | None = None
    """Instead of ``rank``: keep the fewest singular values holding this share of sum(S^2)."""
    targets: list[str] = field(default_factory=lambda: list(LINEARS))
    """Linear layers to factor, by module name."""

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise SlimLMError("give exactly one of --rank or --energy")
        if self.rank is not None and self.rank < 1:
            raise SlimLMError(f"--rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise SlimLMError(f"--energy must be in (0, 1], got {self.energy}")
        bad = [t for t in self.targets if t not in LINEARS]
        if bad:
            raise SlimLMError(f"lowrank target '{bad[0]}' matches no module; valid: {', '.join(LINEARS)}")


class LowRankLinear(nn.Module):
    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.down = nn.Parameter(down)  # (r, in)
        self.up = nn.Parameter(up)  # (out, r)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def dense(self) -> nn.Linear:
        out = nn.Linear(self.down.shape[1], self.up.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.up @ self.down)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _rank_for(S: torch.Tensor, cfg: LowRankConfig, name: str, shape: tuple[int, int]) -> int:
    if cfg.rank is not None:
        if cfg.rank > min(shape):
            raise SlimLMError(f"--rank {cfg.rank} is larger than {name}'s {shape[0]}x{shape[1]} matrix "
                              f"(valid: 1..{min(shape)})")
        return cfg.rank
    e = torch.cumsum(S.double() ** 2, 0) / (S.double() ** 2).sum()
    return int(torch.searchsorted(e, torch.tensor(cfg.energy, dtype=torch.float64)).item()) + 1


def factor(weight: torch.Tensor, rank: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in), up (out, r)) with up @ down the best rank-r approximation of W (diag(scale)-weighted)."""
    W = weight.double() * (scale.double() if scale is not None else 1.0)  # (out, in)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:rank].sqrt()
    up, down = U[:, :rank] * root, root[:, None] * Vh[:rank]  # (out, r), (r, in)
    if scale is not None:
        down = down / scale.double()
    return down.to(weight.dtype), up.to(weight.dtype)


def _linears(model: CausalLM, targets: list[str]):
    for lname, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for attr, child in list(parent.named_children()):
                if attr in targets and isinstance(child, nn.Linear):
                    yield f"model.layers.{lname}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{attr}", parent, attr, child


def check_rank(model: CausalLM, cfg: LowRankConfig) -> None:
    """Refuse a rank larger than a target matrix before any work (one line, the first offender)."""
    if cfg.rank is None:
        return
    for name, _p, _a, lin in _linears(model, cfg.targets):
        _rank_for(torch.empty(0), cfg, name, tuple(lin.weight.shape))


@torch.no_grad()
def input_scales(model: CausalLM, windows: torch.Tensor, targets: list[str]) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel of each target linear on calibration windows (N, T)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, _p, _a, lin in _linears(model, targets):
            def hook(_m, inputs, name=name):
                x = inputs[0].float().abs().sum((0, 1))
                sums[name] = sums.get(name, 0) + x
            handles.append(lin.register_forward_pre_hook(hook))
        for i in range(0, len(windows), 4):
            model(windows[i : i + 4].to(model.device))
    finally:
        for h in handles:
            h.remove()
    n = windows.numel()
    return {k: (v / n).clamp_min(1e-6) for k, v in sums.items()}


@torch.no_grad()
def lowrank(model: CausalLM, cfg: LowRankConfig, scales: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Factor the target linears in place; returns {module name: rank} of the factored ones."""
    ranks: dict[str, int] = {}
    for name, parent, attr, lin in list(_linears(model, cfg.targets)):
        W = lin.weight.detach().float()
        s = scales.get(name) if scales else None
        S = torch.linalg.svdvals((W * s) if s is not None else W)
        r = _rank_for(S, cfg, name, tuple(W.shape))
        if r * (W.shape[0] + W.shape[1]) >= W.numel():
            continue  # no saving: keep it dense
        down, up = factor(W, r, s)
        setattr(parent, attr, LowRankLinear(down, up, None if lin.bias is None else lin.bias.detach().clone()))
        ranks[name] = r
    if not ranks:
        raise SlimLMError("no layer got smaller at this rank/energy: every factored layer would have more parameters")
    return ranks


def densify(model: CausalLM) -> None:
    for _n, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LowRankLinear):
                setattr(parent, attr, child.dense().to(child.up.device))


def factored_params(model: CausalLM) -> int:
    """Parameters of the model with its low-rank layers counted as factors (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def save_lowrank(model: CausalLM, ranks: dict[str, int], path: Path, tokenizer=None, generation_config=None) -> Path:
    """Products as an HF directory + lowrank.json + the factors (lowrank.safetensors, which slimlm
    serves; ``slimlm.compress.serving``). Densifies ``model`` in place."""
    from slimlm.compress.serving import lowrank_factors, save_lowrank_factors
    from slimlm.model.weights import save_model_dir

    factors = lowrank_factors(model)
    densify(model)
    out = save_model_dir(model, path, tokenizer, generation_config)
    save_lowrank_factors(factors, out)
    (out / LOWRANK_FILE).write_text(json.dumps({"ranks": ranks}, indent=1))
    return out


@torch.no_grad()
def refactor(model: CausalLM, model_dir: str | Path) -> dict[str, int]:
    """Rebuild the factors of a saved low-rank model from ``lowrank.json`` (recovery trains these)."""
    f = Path(model_dir) / LOWRANK_FILE
    if not f.is_file():
        raise SlimLMError(f"{model_dir} has no {LOWRANK_FILE}: make it with `slimlm lowrank`")
    ranks = json.loads(f.read_text())["ranks"]
    modules = dict(model.named_modules())
    for name, r in ranks.items():
        parent_name, attr = name.rsplit(".", 1)
        lin = getattr(modules[parent_name], attr)
        if isinstance(lin, LowRankLinear):
            continue  # already factored (hub.load serves a low-rank folder factored)
        down, up = factor(lin.weight.detach().float(), int(r))
        setattr(modules[parent_name], attr,
                LowRankLinear(down, up, None if lin.bias is None else lin.bias.detach().clone()).to(lin.weight.device))
    return ranks
