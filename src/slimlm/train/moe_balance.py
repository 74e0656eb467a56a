"""Load-balancing loss for mixture-of-experts layers, over the micro-batch or the global batch.

Switch Transformer / Mixtral form, per MoE layer with E experts and top-k routing:

    L_bal = E * sum_i f_i * P_i,   f_i = share of the k * N routing choices that went to expert i,
                                   P_i = mean router probability of expert i over the N tokens

'micro_batch': f and P from each micro-batch on each rank, averaged (what most code does).
'global' (Qiu et al., 2025, "Demons in the Detail: On Implementing Load Balancing Loss for
Training Specialized Mixture-of-Expert Models"): f over the whole global batch, so a micro-batch
of one domain (all code, say) is not pushed to spread its tokens over every expert; only the
batch as a whole must be balanced, which lets experts specialize. f's counts are all-reduced
over data-parallel ranks for each micro-batch and accumulated over the update's micro-batches
(the paper's buffer: micro-batch j uses the counts of micro-batches 1..j); P is the exact global
mean (each micro-batch adds its summed probabilities / the update's global token count). With
one micro-batch on one rank both variants are the same loss (tested).

The loss is summed over MoE layers and scaled by ``aux_loss_weight``. f is a count (no gradient);
the gradient reaches the routers through P.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimlm.model.moe import MoEMLP
from slimlm.train import distributed
from slimlm.train.distributed import World

BALANCE_MODES = ("global", "micro_batch")


class LoadBalance:
    def __init__(self, model: nn.Module, mode: str, weight: float, world: World):
        self.layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
        self.mode, self.weight, self.world = mode, weight, world
        self.counts: list[torch.Tensor] = []
        self.total_counts: list[torch.Tensor] = []  # the update's, for load entropy

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def begin_update(self, tokens_global: float, micro_batches: int) -> None:
        """Start an update of ``micro_batches`` micro-batches per rank, ``tokens_global`` routed tokens."""
        self.n_global, self.micro_batches = tokens_global, micro_batches
        self.counts = [torch.zeros(len(m.experts), dtype=torch.float64) for m in self.layers]
        self.total_counts = [c.clone() for c in self.counts]

    def loss(self) -> torch.Tensor:
        """The balancing term for the micro-batch just forwarded, scaled so that ``backward()`` on it
        (after DDP's gradient averaging) adds the update's loss: call once per micro-batch."""
        terms = []
        for li, m in enumerate(self.layers):
            probs, choice = m.router_probs, m.router_choice  # (N, E), (N, k)
            E = probs.shape[-1]
            counts = torch.bincount(choice.flatten().cpu(), minlength=E).double()  # (E,)
            self.total_counts[li] += counts
            if self.mode == "micro_batch":
                f = counts / counts.sum()
                terms.append(E * (f.to(probs) * probs.mean(0)).sum() / self.micro_batches)
            else:
                glob = torch.tensor(distributed.all_reduce_sum(counts.tolist(), self.world), dtype=torch.float64)
                self.counts[li] += glob
                f = self.counts[li] / self.counts[li].sum()
                terms.append(E * (f.to(probs) * probs.sum(0)).sum() * (self.world.size / self.n_global))
            m.router_probs = m.router_choice = None
        return self.weight * torch.stack(terms).sum()

    def load_entropy(self) -> float:
        """Mean over MoE layers of the normalized entropy of this update's expert load on this rank
        (1: perfectly even, 0: one expert takes everything)."""
        out = []
        for c in self.total_counts:
            p = c / c.sum().clamp_min(1)
            h = -(p[p > 0] * p[p > 0].log()).sum()
            out.append(float(h) / math.log(len(c)))
        return sum(out) / max(len(out), 1)
