"""A plain, single-device decoder-only transformer for the Llama family.

RMSNorm -> attention (RoPE, GQA, optional q/k/v bias) -> RMSNorm -> SwiGLU MLP, with
module names equal to Hugging Face's so checkpoints load with ``load_state_dict``.
Caching, batching layout and per-layer hooks live outside the model: attention is delegated
to an :class:`~slimlm.model.attention.AttentionBackend` passed to ``forward``, and the layer
loop is exposed (``embed`` / ``layers`` / ``head``) for runners that act between layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.kernels import elementwise
from slimlm.model.attention import AttentionBackend, DenseAttention
from slimlm.model.config import ModelConfig
from slimlm.model import mup
from slimlm.model.fuse import fused_ok
from slimlm.model.moe import MoEMLP
from slimlm.model.rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = elementwise.rms_norm(x, self.weight, self.eps)  # one native pass (inference on the CPU)
        if y is not None:
            return y
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        dtype = x.dtype  # half precision: normalise in fp32, round, then scale, as transformers does
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, self(h))`` for ``h = x + r`` (a residual add and the next norm; one pass natively,
        unless the module has hooks, which then see the call as usual)."""
        out = None if self._forward_hooks or self._forward_pre_hooks else elementwise.rms_norm(x, self.weight, self.eps, r)
        if out is not None:
            return out
        h = x + r
        return h, self(h)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``F.silu(g) * u`` (one native pass for inference on the CPU)."""
    y = elementwise.silu_mul(g, u)
    return F.silu(g) * u if y is None else y


def rope_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    """x (B, T, H * d), a projection's output -> its heads rotated, (B, H, T, d)."""
    y = elementwise.rope(x, cos, sin, d)
    if y is not None:
        return y.transpose(1, 2)
    B, T = x.shape[:2]
    return apply_rope(x.view(B, T, -1, d).transpose(1, 2), cos, sin)


class Attention(nn.Module):
    qkv: nn.Module | None = None
    """q/k/v as one projection, set for serving by ``model/fuse.py`` (not a sub-module)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        d, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.sizes = (h * d, hkv * d, hkv * d)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend,
        q_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every row writes its keys and values; only rows ``q_rows`` (all when None) query.
        Returns (B, R, D) for the querying rows."""
        B, T, _ = x.shape
        d = self.cfg.head_dim
        if q_rows is None and fused_ok(self.qkv, self.q_proj):
            y = self.qkv(x)
            nq = self.sizes[0] + self.sizes[1]
            qk = rope_heads(y[..., :nq], cos, sin, d)  # q's and k's heads rotated in one call
            v = y[..., nq:].view(B, T, -1, d).transpose(1, 2)
            out = attn.attend(self.layer, qk[:, : self.cfg.num_heads], qk[:, self.cfg.num_heads:], v)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        k = rope_heads(self.k_proj(x), cos, sin, d)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
        if q_rows is None:
            q = rope_heads(self.q_proj(x), cos, sin, d)  # (B, Hq, T, d)
            out = attn.attend(self.layer, q, k, v)  # (B, Hq, T, d)
        else:
            q = rope_heads(self.q_proj(x[:, q_rows]), cos[:, q_rows], sin[:, q_rows], d)  # (B, Hq, R, d)
            out = attn.attend(self.layer, q, k, v, q_rows)  # (B, Hq, R, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, out.shape[2], -1))


class MLP(nn.Module):
    gate_up: nn.Module | None = None
    """gate and up as one projection, set for serving by ``model/fuse.py`` (not a sub-module)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ok(self.gate_up, self.gate_proj):
            g, u = self.gate_up(x).chunk(2, -1)
            return self.down_proj(silu_mul(g, u))
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


@dataclass
class RowPlan:
    """Which rows of a step run a layer (a per-layer plan from the engine's layer hooks).

    Rows outside ``q_rows`` pass the layer unchanged (their hidden state is carried up) but
    still write the layer's keys and values, computed from that hidden state, so later tokens
    find a complete cache (LazyLLM's pruned tokens, early exits). Rows outside ``mlp_rows`` skip
    the MLP sub-block (FFN skipping)."""

    q_rows: torch.Tensor | None = None
    """(R,) rows that attend and continue; None = all."""
    mlp_rows: torch.Tensor | None = None
    """(M,) rows that run the MLP (a subset of ``q_rows``); None = all of ``q_rows``."""


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MoEMLP(cfg, MLP) if cfg.num_experts else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_ln = cfg.post_ln(layer)  # Mix-LN / Post-LN: the same norms, applied after the residual add

    def attn_block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """The attention sub-block with its residual (Pre-LN, or Post-LN for Mix-LN's first
        layers); only ``rows`` (all when None) change, every row writes its keys and values."""
        if self.post_ln:
            a = self.self_attn(x, cos, sin, attn, rows)  # (B, R, D)
            if rows is None:
                return self.input_layernorm(x + a)
            return x.index_copy(1, rows, self.input_layernorm(x[:, rows] + a))
        a = self.self_attn(self.input_layernorm(x), cos, sin, attn, rows)
        return x + a if rows is None else x.index_add(1, rows, a)

    def mlp_block(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP sub-block with its residual, for ``rows`` (all when None)."""
        if rows is not None:
            return x if rows.numel() == 0 else x.index_copy(1, rows, self.mlp_block(x[:, rows]))
        if self.post_ln:
            return self.post_attention_layernorm(x + self.mlp(x))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend,
        plan: RowPlan | None = None,
    ) -> torch.Tensor:
        if plan is None and not self.post_ln:  # Pre-LN: the residual add and the second norm in one pass
            h, n = self.post_attention_layernorm.add_forward(x, self.self_attn(self.input_layernorm(x), cos, sin, attn))
            m = self.mlp(n)
            return h + m if h.requires_grad else h.add_(m)  # h is this call's own tensor
        if plan is None:
            return self.mlp_block(self.attn_block(x, cos, sin, attn))
        x = self.attn_block(x, cos, sin, attn, plan.q_rows)
        return self.mlp_block(x, plan.mlp_rows if plan.mlp_rows is not None else plan.q_rows)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder-only LM. ``forward(input_ids, position_ids, attn)`` -> logits (B, T', vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)
        self.attn_scale = mup.attention_scale(cfg)  # head_dim**-0.5 unless μP
        self.embed_mult, self.logit_mult = mup.embedding_multiplier(cfg), mup.logit_multiplier(cfg)  # 1, 1 unless μP

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the head may hold packed low-bit weights

    def windows(self) -> dict[int, int | None]:
        return {i: self.cfg.window_for_layer(i) for i in range(self.cfg.num_layers)}

    def dense_attention(
        self, position_ids: torch.Tensor, segment_ids: torch.Tensor | None = None
    ) -> DenseAttention:
        return DenseAttention(position_ids, segment_ids, self.attn_scale, self.windows())

    # The three stages, exposed so runners can act between layers.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        return h if self.embed_mult == 1.0 else h * self.embed_mult

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        return self.lm_head(h if self.logit_mult == 1.0 else h * self.logit_mult)  # (B, T, V)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids, segment_ids: (B, T). ``attn`` defaults to dense causal
        attention within segments. ``logits_index`` (B, K) selects which positions get logits
        (e.g. only the last one of each prompt), saving the vocab projection elsewhere."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if attn is None:
            attn = self.dense_attention(position_ids, segment_ids)
        h = self.embed(input_ids)
        cos, sin = self.rotary(position_ids, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, attn)
        if logits_index is not None:
            h = h.gather(1, logits_index[..., None].expand(-1, -1, h.shape[-1]))  # (B, K, D)
        return self.head(h)
