"""Activation-based importance of every prunable unit (Minitron, Muralidharan et al., 2024, sec. 2.2).

One forward pass over calibration windows with hooks on the model (added from outside, removed in
``finally``) gives, per unit, the mean over calibration tokens of:

- attention head (layer l, head h): the L2 norm of the head's output before ``o_proj``
- KV group (layer l, group g): the sum of its query heads' importances
- MLP neuron (layer l, neuron i): |silu(gate_i(x)) * up_i(x)|, the input of ``down_proj``
- embedding channel c: |RMSNorm output_c| summed over every norm that feeds a layer
- layer l: block importance 1 - cos(h_in, h_out) of the residual stream across the layer
  (ShortGPT, Men et al., 2024; Minitron's depth study uses it next to perplexity)

Minitron aggregates with the mean over the batch and the L2 norm over the sequence; per-token
means are the same ranking up to a constant for equal-length windows, which is what we feed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimlm.model.transformer import CausalLM


@dataclass
class Importance:
    heads: torch.Tensor  # (L, H)
    neurons: torch.Tensor  # (L, I)
    channels: torch.Tensor  # (D,)
    layers: torch.Tensor  # (L,)
    tokens: int

    def kv_groups(self, num_kv_heads: int) -> torch.Tensor:
        L, H = self.heads.shape
        return self.heads.view(L, num_kv_heads, H // num_kv_heads).sum(-1)  # (L, Hkv)

    def ranking(self, top: int = 8) -> list[str]:
        """Human-readable summary: layers by importance, most important channels/heads."""
        order = torch.argsort(self.layers, descending=True).tolist()
        lines = ["layers (most to least important, 1 - cos): "
                 + ", ".join(f"{i}:{self.layers[i]:.3f}" for i in order)]
        for l in range(self.heads.shape[0]):
            h = torch.argsort(self.heads[l], descending=True).tolist()
            lines.append(f"layer {l} heads by importance: {h}")
        ch = torch.argsort(self.channels, descending=True)[:top].tolist()
        lines.append(f"top {top} embedding channels: {ch}")
        return lines


@torch.no_grad()
def measure(model: CausalLM, windows: torch.Tensor, batch_size: int = 4) -> Importance:
    """Run ``windows`` (N, T) through ``model`` and accumulate every unit's importance."""
    cfg = model.cfg
    L, H, d = cfg.num_layers, cfg.num_heads, cfg.head_dim
    dev = model.device
    heads = torch.zeros(L, H, dtype=torch.float64)
    neurons = torch.zeros(L, cfg.intermediate_size, dtype=torch.float64)
    channels = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    layers = torch.zeros(L, dtype=torch.float64)

    def on_o_proj(l: int):
        def hook(_m, inputs):
            x = inputs[0].float()  # (B, T, H*d)
            heads[l] += x.view(*x.shape[:-1], H, d).norm(dim=-1).sum((0, 1)).double().cpu()
        return hook

    def on_down(l: int):
        def hook(_m, inputs):
            neurons[l] += inputs[0].float().abs().sum((0, 1)).double().cpu()  # (I,)
        return hook

    def on_norm(_m, _inputs, out):
        channels.add_(out.float().abs().sum((0, 1)).double().cpu())  # (D,)

    def on_layer(l: int):
        def hook(_m, inputs, out):
            cos = F.cosine_similarity(inputs[0].float(), out.float(), dim=-1)  # (B, T)
            layers[l] += (1 - cos).sum().double().cpu()
        return hook

    handles = []
    try:
        for l, layer in enumerate(model.model.layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(l)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(l)))
            handles.append(layer.input_layernorm.register_forward_hook(on_norm))
            handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
            handles.append(layer.register_forward_hook(on_layer(l)))
        n = 0
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size].to(dev)  # (b, T)
            model(batch, logits_index=torch.zeros(batch.shape[0], 1, dtype=torch.long, device=dev))
            n += batch.numel()
    finally:
        for h in handles:
            h.remove()
    n = max(n, 1)
    return Importance(heads / n, neurons / n, channels / n, layers / n, n)
