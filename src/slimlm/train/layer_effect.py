"""How much each layer contributes: the measure behind Mix-LN's claim (Li et al., 2024, Sec. 3).

For layer l with input h_l and output h_{l+1} (B, T, D):
    angular distance  d_l = mean over tokens of arccos(cos(h_l, h_{l+1})) / pi     (Gromov et al., 2024)
    drop delta        loss(model without layer l) - loss(model)
A layer that barely changes its input (d_l near 0, delta near 0) could be pruned: Pre-LN's deep
layers look like that; Mix-LN's should not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimlm.data.packing import IGNORE, Batch
from slimlm.model.transformer import CausalLM


@dataclass
class LayerEffect:
    layer: int
    angular_distance: float
    drop_delta: float


def _run(model: CausalLM, b: Batch, skip: int | None) -> tuple[float, list[float]]:
    """(summed loss, per-layer summed angular distance) with layer ``skip`` left out."""
    attn = model.dense_attention(b.position_ids, b.segment_ids)
    h = model.embed(b.input_ids)  # (B, T, D)
    cos, sin = model.rotary(b.position_ids, h.dtype)
    dists = []
    for i, layer in enumerate(model.model.layers):
        if i == skip:
            continue
        out = layer(h, cos, sin, attn)
        c = F.cosine_similarity(h.float(), out.float(), dim=-1).clamp(-1, 1)  # (B, T)
        dists.append(float(torch.arccos(c).sum() / math.pi))
        h = out
    logits = model.head(h)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return float(loss), dists


@torch.no_grad()
def layer_effects(model: CausalLM, batches: list[Batch]) -> tuple[float, list[LayerEffect]]:
    """(mean loss of the full model, one LayerEffect per layer) over ``batches``."""
    model.eval()
    n_tok = sum(b.target_tokens for b in batches)
    n_pos = sum(b.input_ids.numel() for b in batches)
    full, dist = 0.0, [0.0] * model.cfg.num_layers
    for b in batches:
        loss, d = _run(model, b, None)
        full += loss
        dist = [x + y for x, y in zip(dist, d)]
    base = full / n_tok
    out = []
    for i in range(model.cfg.num_layers):
        dropped = sum(_run(model, b, i)[0] for b in batches) / n_tok
        out.append(LayerEffect(i, dist[i] / n_pos, dropped - base))
    return base, out
