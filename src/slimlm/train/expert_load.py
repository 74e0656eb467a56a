"""Per-domain expert load of a mixture-of-experts model: do experts specialize (code vs prose)?

    slimlm expert-load runs/moe-global --data code=data/stdlib-8k --data prose=data/shakespeare-8k

For each MoE layer and each domain (a prepared folder's held-out split), the share of the top-k
routing choices each expert receives (the router's choice exactly as in ``MoEMLP.forward``).
Per layer it reports, for each domain, the normalized entropy of that load (1 = spread evenly,
0 = one expert) and, across two or more domains, the specialization: the Jensen-Shannon
divergence between the domains' load distributions in bits (0 = every domain uses the experts
alike; 1 = two domains use disjoint experts). This is the measure behind "Demons in the Detail"
(Qiu et al., 2025), whose claim is that global-batch balancing lets experts specialize by domain
where micro-batch balancing forces every sequence to spread over all experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimlm.data.packing import Batch
from slimlm.errors import SlimLMError
from slimlm.model.moe import MoEMLP


@dataclass
class LayerLoad:
    layer: int
    shares: dict[str, list[float]]
    """domain -> share of routing choices per expert (sums to 1)."""

    def entropy(self, domain: str) -> float:
        p = [x for x in self.shares[domain] if x > 0]
        return -sum(x * math.log(x) for x in p) / math.log(len(self.shares[domain]))

    def js_divergence(self) -> float:
        """Generalized Jensen-Shannon divergence (bits) of the domains' load distributions, equal weights."""
        ds = list(self.shares.values())
        mix = [sum(col) / len(ds) for col in zip(*ds)]

        def h(p):
            return -sum(x * math.log2(x) for x in p if x > 0)

        return h(mix) - sum(h(p) for p in ds) / len(ds)


@torch.no_grad()
def expert_load(model: torch.nn.Module, domains: dict[str, list[Batch]]) -> list[LayerLoad]:
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    if not layers:
        raise SlimLMError("the model has no mixture-of-experts layers (num_local_experts is 0)")
    counts: list[torch.Tensor] = []
    hooks = []
    for m in layers:
        def hook(mod, inp, out, m=m):
            choice = out.float().softmax(-1).topk(m.top_k, dim=-1).indices  # as MoEMLP.forward
            counts.append(torch.bincount(choice.flatten().cpu(), minlength=out.shape[-1]).double())
        hooks.append(m.gate.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    out = {i: {} for i in range(len(layers))}
    try:
        for name, batches in domains.items():
            total = [torch.zeros(len(m.experts), dtype=torch.float64) for m in layers]
            for b in batches:
                counts.clear()
                model(b.input_ids, b.position_ids, segment_ids=b.segment_ids)
                for i, c in enumerate(counts):
                    total[i] += c
            for i, t in enumerate(total):
                out[i][name] = (t / t.sum().clamp_min(1)).tolist()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [LayerLoad(i, out[i]) for i in range(len(layers))]


def report(loads: list[LayerLoad]) -> list[str]:
    names = list(loads[0].shares)
    rows = ["layer  " + "  ".join(f"entropy[{n}]" for n in names) + "  specialization(JS bits)  "
            + "  ".join(f"load[{n}]" for n in names)]
    for ld in loads:
        ent = "  ".join(f"{ld.entropy(n):{len(n) + 9}.3f}" for n in names)
        shares = "  ".join("/".join(f"{x:.2f}" for x in ld.shares[n]) for n in names)
        rows.append(f"{ld.layer:5d}  {ent}  {ld.js_divergence():23.4f}  {shares}")
    mean_js = sum(ld.js_divergence() for ld in loads) / len(loads)
    rows.append(f"mean specialization over layers: {mean_js:.4f} bits; mean entropy "
                + ", ".join(f"{n} {sum(ld.entropy(n) for ld in loads) / len(loads):.3f}" for n in names))
    return rows
