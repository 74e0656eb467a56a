"""Compacter (Karimi Mahabadi et al., 2021): bottleneck adapters whose projections are sums of
Kronecker products with shared "slow" weights.

    adapter(y) = y + up(GELU(down(y)))         after o_proj and after down_proj (Houlsby placement)
    W (out, in) = sum_{i=1..n} A_i (x) B_i      A_i (n, n): shared by every adapter in the model
    B_i = s_i t_i^T                             s_i (out/n, r), t_i (r, in/n): per layer, rank r (1 in the paper)

Trainable parameters: n^3 (shared A) + per adapter 2 r (d + k) + d + k (both PHM layers' factors
and biases), d the hidden size, k the bottleneck. The up projection's t starts at zero, so every
adapter starts as the identity and training starts from the base model's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slimlm.compress.adapters.base import METHODS, Method, freeze
from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM


class SharedKron(nn.Module):
    def __init__(self, n: int, gen: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.randn(n, n, n, generator=gen) / n)  # (n, n, n): n matrices A_i of (n, n)


class PHMLinear(nn.Module):
    """A linear map (in -> out) parametrised as sum_i A_i (x) (s_i t_i)."""

    def __init__(self, shared: SharedKron, n: int, d_in: int, d_out: int, rank: int, zero: bool = False,
                 gen: torch.Generator | None = None):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # referenced, not owned: counted once in the model
        self.s = nn.Parameter(torch.randn(n, d_out // n, rank, generator=gen) * (d_out // n) ** -0.5)  # (n, out/n, r)
        t = torch.zeros(n, rank, d_in // n) if zero else torch.randn(n, rank, d_in // n, generator=gen) * (d_in // n) ** -0.5
        self.t = nn.Parameter(t)  # (n, r, in/n)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def weight(self) -> torch.Tensor:
        B = self.s @ self.t  # (n, out/n, in/n)
        A = self.shared.A  # (n, n, n)
        n = A.shape[0]
        # sum_i kron(A_i, B_i): (n, n) (x) (out/n, in/n) -> (out, in)
        W = torch.einsum("iab,icd->acbd", A, B)  # (n, out/n, n, in/n)
        return W.reshape(n * B.shape[1], n * B.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class CompacterLinear(nn.Module):
    """A frozen linear followed by a Compacter adapter on its output."""

    def __init__(self, base: nn.Linear, shared: SharedKron, n: int, k: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        d = base.out_features
        self.down = PHMLinear(shared, n, d, k, rank, gen=gen)
        self.up = PHMLinear(shared, n, k, d, rank, zero=True, gen=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., d)
        return y + self.up(F.gelu(self.down(y)))


def compacter_params(n: int, d: int, k: int, rank: int, adapters: int) -> int:
    """The paper's count with biases: n^3 + adapters * (2 r (d + k) + d + k)."""
    return n**3 + adapters * (2 * rank * (d + k) + d + k)


@METHODS.register("compacter")
class Compacter(Method):
    def apply(self, model: CausalLM) -> None:
        cfg, d = self.cfg, model.cfg.hidden_size
        if d % cfg.n:
            raise SlimLMError(f"finetune.n {cfg.n} must divide the hidden size {d}")
        freeze(model)
        gen = torch.Generator().manual_seed(cfg.seed)
        model.compacter_shared = SharedKron(cfg.n, gen).to(model.device)
        for layer in model.model.layers:
            layer.self_attn.o_proj = CompacterLinear(layer.self_attn.o_proj, model.compacter_shared, cfg.n,
                                                     cfg.bottleneck, cfg.rank, gen).to(model.device)
            layer.mlp.down_proj = CompacterLinear(layer.mlp.down_proj, model.compacter_shared, cfg.n,
                                                  cfg.bottleneck, cfg.rank, gen).to(model.device)

    def export(self, model: CausalLM, out: Path, tokenizer=None, generation_config=None) -> list[Path]:
        """``adapter/``: the adapter tensors only (compacter.safetensors + adapter_config.json);
        ``compacter/``: a servable folder, the frozen base weights as a plain HF directory plus the
        adapters (compacter/adapters.safetensors + compacter.json), which ``slimlm.model.hub.load`` (and so
        the engine and server) attaches again (``slimlm.compress.serving``)."""
        from slimlm.compress.serving import COMPACTER_FILE, COMPACTER_WEIGHTS
        from slimlm.model.weights import save_model_dir

        path = out / "adapter"
        path.mkdir(parents=True, exist_ok=True)
        state = {k: p.detach().float().contiguous().cpu() for k, p in model.named_parameters() if p.requires_grad}
        meta = {"method": "compacter", "n": self.cfg.n, "bottleneck": self.cfg.bottleneck, "rank": self.cfg.rank}
        save_file(state, str(path / "compacter.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(meta, indent=2))
        served = save_model_dir(strip(model), out / "compacter", tokenizer, generation_config)
        (served / COMPACTER_WEIGHTS).parent.mkdir(exist_ok=True)
        save_file(state, str(served / COMPACTER_WEIGHTS), metadata={"format": "pt"})
        (served / COMPACTER_FILE).write_text(json.dumps(meta, indent=2))
        return [path, served]


def strip(model: CausalLM) -> CausalLM:
    """The base model (a shallow copy sharing the frozen weights) without the adapters."""
    import copy

    base = copy.copy(model)
    base._modules = dict(model._modules)
    base._modules.pop("compacter_shared", None)
    base.model = copy.deepcopy(model.model)
    for layer in base.model.layers:
        for parent, attr in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            child = getattr(parent, attr)
            if isinstance(child, CompacterLinear):
                lin = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=child.bias is not None)
                lin.weight, lin.bias = child.weight, child.bias
                setattr(parent, attr, lin)
    if model.cfg.tie_word_embeddings:
        base.lm_head = copy.copy(model.lm_head)
        base.lm_head.weight = base.model.embed_tokens.weight
    return base
