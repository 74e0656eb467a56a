"""Token-prediction mixtures: next-token prediction mixed with farther targets (TokenUnify's idea
for causal LMs; Chen et al., 2024, "TokenUnify: Scalable Autoregressive Visual Pre-training with
Mixture Token Prediction", mixes random-token, next-token and next-all-token prediction).

For a causal LM the three terms read off the same logits z_t (the head at position t), within
each document and a horizon of K tokens:

    next        -log p_t(x_{t+1})                                   (the usual objective)
    next_all    mean_{k=1..K} -log p_t(x_{t+k})                     next-all-token prediction
    random      -log p_t(x_{t+k}),  k ~ U{2..K} drawn per update      random-position prediction

    loss = (w_next * next + w_all * next_all + w_random * random) / (w_next + w_all + w_random)

summed over positions (the trainer divides by the update's target count, as for plain NTP).
Targets that cross a document boundary or the end of the row are left out. Held-out evaluation
stays plain next-token loss, so runs compare on the same measure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.data.packing import IGNORE, Batch


def offset_targets(batch: Batch, k: int) -> torch.Tensor:
    """x_{t+k} for each position t (B, T), IGNORE where it leaves the document or the row."""
    labels = batch.labels  # labels[:, t] = x_{t+1}
    B, T = labels.shape
    out = torch.full_like(labels, IGNORE)
    if k > T:
        return out
    tgt = labels[:, k - 1 :]  # (B, T - k + 1)
    ok = tgt != IGNORE
    if batch.segment_ids is not None:
        ok &= batch.segment_ids[:, k - 1 :] == batch.segment_ids[:, : T - k + 1]
    ok &= labels[:, : T - k + 1] != IGNORE  # position t itself must have a target in its document
    out[:, : T - k + 1] = torch.where(ok, tgt, torch.full_like(tgt, IGNORE))
    return out


def nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed -log p over valid targets, per-position validity) for logp (B, T, V), targets (B, T)."""
    valid = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T)
    return -(picked * valid).sum(), valid


def mixture_loss_sum(model: torch.nn.Module, batch: Batch, w_next: float, w_all: float, w_random: float,
                     horizon: int, generator: torch.Generator | None = None) -> torch.Tensor:
    logits = model(batch.input_ids, batch.position_ids, segment_ids=batch.segment_ids)  # (B, T, V)
    logp = logits.float().log_softmax(-1)
    total = torch.zeros((), device=logits.device)
    if w_next:
        total = total + w_next * nll_sum(logp, batch.labels)[0]
    if w_all:
        per_pos = torch.zeros(batch.labels.shape, device=logits.device)  # summed nll per position
        count = torch.zeros_like(per_pos)
        for k in range(1, horizon + 1):
            tgt = offset_targets(batch, k)
            valid = tgt != IGNORE
            per_pos = per_pos - logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * valid
            count = count + valid
        has = batch.labels != IGNORE
        total = total + w_all * (per_pos[has] / count[has].clamp(min=1)).sum()
    if w_random:
        k = int(torch.randint(2, horizon + 1, (1,), generator=generator)) if horizon >= 2 else 1
        total = total + w_random * nll_sum(logp, offset_targets(batch, k))[0]
    return total / (w_next + w_all + w_random)
