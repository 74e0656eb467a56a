"""μP, the maximal update parameterization (Yang et al., 2022, "Tensor Programs V"), as MiniCPM's
"model wind tunnel" uses it (Hu et al., 2024, Sec. 3): hyper-parameters tuned on a narrow model
carry over to wider ones.

A model of hidden width d with ``parameterization = "mup"`` and base width d0 has the width
multiplier m = d / d0 and differs from the standard parameterization (SP) in four places, for
Adam-type optimizers (Tensor Programs V, Table 3, with the output multiplier of its Table 8 /
MiniCPM's ``dim_model_base``):

=========================  ==============================  =================================
what                       standard                        μP
=========================  ==============================  =================================
embedding output           E[x]                            input_multiplier * E[x]
logits                     W_out h                         output_multiplier / m * W_out h
hidden matrices' init std  sigma (o/down: sigma/sqrt(2L))  the same / sqrt(m)
hidden matrices' Adam lr   lr                              lr / m
attention scale            1/sqrt(d_head)                  sqrt(d0_head) / d_head
=========================  ==============================  =================================

"Hidden matrices" are the 2-D weights inside the decoder layers (q/k/v/o, the MLP's or experts'
gate/up/down, MoE routers): their fan-in grows with width. Embeddings, the output head, norms and
biases keep sigma and lr. d0_head is the base model's head width (0: this model's head_dim, i.e.
heads are added as the model widens and d_head stays put, as in MiniCPM; then the scale is the
usual 1/sqrt(d_head)). At m = 1 with both multipliers 1, μP is exactly SP (tested), so a recipe
tuned in SP at the base width is the starting point of the μP sweep.

Not included: MiniCPM's depth scaling of the residual branches (``scale_depth``), the weight
decay is AdamW's decoupled one scaled with the lr (torch's convention).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimlm.model.config import ModelConfig

PARAMETERIZATIONS = ("standard", "mup")


def check(cfg: ModelConfig) -> None:
    """One-line ValueErrors naming the field for settings μP cannot use."""
    if cfg.parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}; got '{cfg.parameterization}'")
    if cfg.parameterization != "mup":
        return
    if not (isinstance(cfg.mup_base_width, int) and cfg.mup_base_width > 0):
        raise ValueError(f"mup_base_width must be a positive integer with parameterization 'mup'; got {cfg.mup_base_width!r}")
    for name in ("mup_input_multiplier", "mup_output_multiplier"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number; got {v!r}")
    if cfg.mup_base_head_dim < 0:
        raise ValueError(f"mup_base_head_dim must be >= 0 (0: the model's head_dim); got {cfg.mup_base_head_dim}")


def width_multiplier(cfg: ModelConfig) -> float:
    """m = hidden_size / mup_base_width (1 for the standard parameterization)."""
    return cfg.hidden_size / cfg.mup_base_width if cfg.parameterization == "mup" else 1.0


def embedding_multiplier(cfg: ModelConfig) -> float:
    return float(cfg.mup_input_multiplier) if cfg.parameterization == "mup" else 1.0


def logit_multiplier(cfg: ModelConfig) -> float:
    """output_multiplier / m: applied to the final hidden state before the (linear, bias-free) head."""
    return float(cfg.mup_output_multiplier) / width_multiplier(cfg) if cfg.parameterization == "mup" else 1.0


def attention_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_head) in SP; sqrt(d0_head)/d_head in μP (1/d attention, equal to SP at d_head = d0_head)."""
    if cfg.parameterization != "mup":
        return cfg.head_dim**-0.5
    return math.sqrt(cfg.mup_base_head_dim or cfg.head_dim) / cfg.head_dim


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """A 2-D weight inside the decoder layers (its fan-in scales with the width)."""
    return ndim == 2 and "layers." in name


def init_scale(cfg: ModelConfig, name: str, ndim: int) -> float:
    """Factor on a weight's SP init std: 1/sqrt(m) for hidden matrices under μP, else 1."""
    return width_multiplier(cfg) ** -0.5 if is_hidden_matrix(name, ndim) else 1.0


def lr_multiplier(cfg: ModelConfig, name: str, ndim: int) -> float:
    """Factor on the schedule's lr for an Adam-type optimizer: 1/m for hidden matrices under μP, else 1."""
    return 1.0 / width_multiplier(cfg) if is_hidden_matrix(name, ndim) else 1.0


def split_lr_groups(groups: list[dict], named: list[tuple[str, object]], cfg: ModelConfig) -> list[dict]:
    """Split optimizer param groups so each has one ``lr_mult`` (the trainer multiplies the schedule's
    lr by it). ``named``: (name, parameter) of the model. SP returns ``groups`` unchanged."""
    if cfg.parameterization != "mup":
        return groups
    mult = {id(p): lr_multiplier(cfg, n, p.dim()) for n, p in named}
    out = []
    for g in groups:
        by: dict[float, list] = {}
        for p in g["params"]:
            by.setdefault(mult.get(id(p), 1.0), []).append(p)
        if not by:
            out.append({**g, "lr_mult": 1.0})
        for m, ps in sorted(by.items(), reverse=True):
            out.append({**g, "params": ps, "lr_mult": m})
    return out
