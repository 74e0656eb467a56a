"""Verification of drafted tokens: lossless speculative sampling.

Leviathan et al. 2023 / Chen et al. 2023: draft x_i ~ q_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is drawn from the residual
norm(max(0, p_i - q_i)) and drafting stops; if all k are accepted a bonus token is drawn from
p_{k+1}. The output then follows the target distribution p exactly. Greedy requests accept
while the draft equals the target's argmax.
"""

from __future__ import annotations

import torch

from slimlm.engine.params import SamplingParams
from slimlm.engine.sampling import apply_top_k_top_p_min_p


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the ordinary sampler draws from (penalties excluded): (N, V)."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0:
        n = logits.shape[0]
        logits = apply_top_k_top_p_min_p(
            logits, torch.full((n,), params.top_k), torch.full((n,), params.top_p), torch.full((n,), params.min_p)
        )
    return logits.softmax(-1)


def verify_greedy(target_logits: torch.Tensor, drafts: list[int]) -> list[int]:
    """target_logits (k+1, V). Returns accepted drafts followed by the target's own next token."""
    best = target_logits.argmax(-1).tolist()
    out = []
    for i, d in enumerate(drafts):
        if best[i] != d:
            return out + [best[i]]
        out.append(d)
    return out + [best[len(drafts)]]


def verify_sampled(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], generator: torch.Generator | None
) -> list[int]:
    """p: target probs (k+1, V); q: draft probs (k, V) the drafts were drawn from."""
    out = []
    for i, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device)
        if float(u) * float(q[i, d]) <= float(p[i, d]):  # u < p/q without dividing by zero
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[i]
        return out + [int(torch.multinomial(dist, 1, generator=generator))]
    return out + [int(torch.multinomial(p[len(drafts)], 1, generator=generator))]


def verify_tree_greedy(target_logits: torch.Tensor, tokens: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """Greedy verification of a draft tree. ``tokens`` (T,) are the flattened tree with the
    last accepted token at index 0, ``parents[i]`` the parent index of token i (-1 for the
    root); ``target_logits`` (T, V) are the target's logits at every node.

    Walks from the root, each time to the child whose token is the target's argmax. Returns
    the tokens to append (accepted drafts + the target's next token) and the node path (root
    first) whose KV is valid. The output equals plain greedy decoding.
    """
    best = target_logits.argmax(-1).tolist()
    children: dict[int, dict[int, int]] = {}
    for i, p in enumerate(parents):
        if p >= 0:
            children.setdefault(p, {}).setdefault(tokens[i], i)
    out, path, node = [], [0], 0
    while True:
        t = best[node]
        out.append(t)
        nxt = children.get(node, {}).get(t)
        if nxt is None:
            return out, path
        path.append(nxt)
        node = nxt
