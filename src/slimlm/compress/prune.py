"""Width and depth pruning to target sizes (Minitron, Muralidharan et al., 2024, sec. 2).

Given :class:`~slimlm.compress.importance.Importance`, keep the most important units and slice
every weight that touches them; the result is a plain :class:`CausalLM` of a smaller config, saved
as a Hugging Face directory like any other model.

Before any retraining the pruned model computes exactly what the original computes with the
pruned units masked (their weights zeroed, their layers skipped). Dropping residual channels
changes the RMS each norm divides by (mean over D' channels instead of D); scaling the norm
weights by sqrt(D / D') and ``rms_norm_eps`` by D / D' makes the pruned norms equal to the
original ones on the masked residual stream, so the equality holds for width pruning too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from slimlm.compress.importance import Importance
from slimlm.errors import SlimLMError
from slimlm.model.config import ModelConfig
from slimlm.model.transformer import CausalLM
from slimlm.model.weights import build_model


@dataclass
class PruneConfig:
    """Target sizes; ``None`` keeps the source's size."""

    hidden: int | None = None
    """Embedding channels kept (Minitron's 'embedding' axis)."""
    intermediate: int | None = None
    """MLP neurons kept per layer."""
    heads: int | None = None
    """Query heads kept per layer (a multiple of kv_heads; head_dim is unchanged)."""
    kv_heads: int | None = None
    """KV groups kept per layer (whole groups: each keeps its best query heads)."""
    layers: int | None = None
    """Layers kept, chosen by block importance (Minitron's depth pruning)."""
    drop_layers: list[int] = field(default_factory=list)
    """Explicit layer indices to drop instead of ``layers``."""

    def validate(self, src: ModelConfig) -> ModelConfig:
        """The pruned model's config; one-line errors for impossible targets, before any work."""
        def check(name: str, value: int | None, limit: int) -> int:
            if value is None:
                return limit
            if not 1 <= value <= limit:
                raise SlimLMError(f"--{name.replace('_', '-')} {value} is not possible: the source has {limit}; "
                                  f"valid: 1..{limit}")
            return value

        hidden = check("hidden", self.hidden, src.hidden_size)
        inter = check("intermediate", self.intermediate, src.intermediate_size)
        kv = check("kv_heads", self.kv_heads, src.num_kv_heads)
        default_heads = src.num_heads if self.kv_heads is None else kv * src.num_kv_groups
        heads = check("heads", self.heads if self.heads is not None else default_heads, src.num_heads)
        if heads % kv:
            raise SlimLMError(f"--heads {heads} must be a multiple of --kv-heads {kv} (grouped-query attention)")
        if heads // kv > src.num_kv_groups:
            raise SlimLMError(f"--heads {heads} with --kv-heads {kv} needs {heads // kv} query heads per KV group; "
                              f"the source has {src.num_kv_groups}: valid --heads up to {kv * src.num_kv_groups}")
        if (hidden != src.hidden_size or heads != src.num_heads) and hidden % heads:
            raise SlimLMError(f"--heads {heads} does not divide the hidden size {hidden}; valid head counts: "
                              f"{', '.join(str(h) for h in range(kv, hidden + 1, kv) if hidden % h == 0 and h <= src.num_heads)}")
        if self.layers is not None and self.drop_layers:
            raise SlimLMError("give --layers or --drop-layers, not both")
        bad = [i for i in self.drop_layers if not 0 <= i < src.num_layers]
        if bad:
            raise SlimLMError(f"--drop-layers {bad[0]} is not a layer; valid: 0..{src.num_layers - 1}")
        n_layers = check("layers", self.layers, src.num_layers) if self.layers is not None else (
            src.num_layers - len(set(self.drop_layers)))
        if n_layers < 1:
            raise SlimLMError(f"--drop-layers would drop all {src.num_layers} layers")
        return src.replace(hidden_size=hidden, intermediate_size=inter, num_heads=heads, num_kv_heads=kv,
                           num_layers=n_layers, head_dim=src.head_dim,
                           rms_norm_eps=src.rms_norm_eps * src.hidden_size / hidden, extra=dict(src.extra))


@dataclass
class PrunePlan:
    """Which units survive (indices into the source model), for reports and masked references."""

    layers: list[int]
    channels: torch.Tensor  # (D',)
    heads: dict[int, torch.Tensor]  # source layer -> kept query heads (H',)
    kv_groups: dict[int, torch.Tensor]  # source layer -> kept KV groups (Hkv',)
    neurons: dict[int, torch.Tensor]  # source layer -> kept neurons (I',)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties: lower index first)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def plan(src: ModelConfig, dst: ModelConfig, imp: Importance, pc: PruneConfig) -> PrunePlan:
    if pc.drop_layers:
        keep_layers = [i for i in range(src.num_layers) if i not in set(pc.drop_layers)]
    else:
        keep_layers = _top(imp.layers, dst.num_layers).tolist()
    per_group_src, per_group = src.num_kv_groups, dst.num_heads // dst.num_kv_heads
    groups = imp.kv_groups(src.num_kv_heads)  # (L, Hkv)
    heads, kv, neurons = {}, {}, {}
    for l in keep_layers:
        kv[l] = _top(groups[l], dst.num_kv_heads)
        hs = imp.heads[l].view(src.num_kv_heads, per_group_src)
        heads[l] = torch.cat([g * per_group_src + _top(hs[g], per_group) for g in kv[l].tolist()])
        neurons[l] = _top(imp.neurons[l], dst.intermediate_size)
    return PrunePlan(keep_layers, _top(imp.channels, dst.hidden_size), heads, kv, neurons)


def _rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d)).flatten()  # (H' * d,)


def prune(model: CausalLM, imp: Importance, pc: PruneConfig) -> tuple[CausalLM, PrunePlan]:
    """The pruned model (float32, CPU) and the plan it followed."""
    src = model.cfg
    dst = pc.validate(src)
    p = plan(src, dst, imp, pc)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    ch, d = p.channels, src.head_dim
    scale = math.sqrt(src.hidden_size / dst.hidden_size)
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, ch],
        "model.norm.weight": sd["model.norm.weight"][ch] * scale,
    }
    if not src.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:, ch]
    for new, l in enumerate(p.layers):
        a, n = f"model.layers.{l}.", f"model.layers.{new}."
        q_rows, kv_rows = _rows(p.heads[l], d), _rows(p.kv_groups[l], d)
        rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
                "mlp.gate_proj": p.neurons[l], "mlp.up_proj": p.neurons[l]}
        for name, r in rows.items():  # readers of the residual stream: (out', D')
            out[n + name + ".weight"] = sd[a + name + ".weight"][r][:, ch]
            if a + name + ".bias" in sd:
                out[n + name + ".bias"] = sd[a + name + ".bias"][r]
        cols = {"self_attn.o_proj": q_rows, "mlp.down_proj": p.neurons[l]}
        for name, c in cols.items():  # writers to the residual stream: (D', in')
            out[n + name + ".weight"] = sd[a + name + ".weight"][ch][:, c]
            if a + name + ".bias" in sd:
                out[n + name + ".bias"] = sd[a + name + ".bias"][ch]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[n + norm + ".weight"] = sd[a + norm + ".weight"][ch] * scale
    dst.sliding_layers = tuple(new for new, l in enumerate(p.layers) if l in src.sliding_layers)
    if not dst.sliding_layers:
        dst.sliding_window = None
    return build_model(dst, out, source="pruned model"), p


def masked_copy(model: CausalLM, p: PrunePlan) -> tuple[CausalLM, list[int]]:
    """The reference: a copy of ``model`` with every pruned unit's weights zeroed, and the layers
    to skip. Its logits with those layers skipped equal the pruned model's."""
    import copy

    ref = copy.deepcopy(model).float()
    cfg = model.cfg
    d = cfg.head_dim
    drop_ch = torch.ones(cfg.hidden_size, dtype=torch.bool)
    drop_ch[p.channels] = False
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, drop_ch] = 0
        for l in p.layers:
            layer = ref.model.layers[l]
            keep_q = torch.zeros(cfg.num_heads * d, dtype=torch.bool)
            keep_q[_rows(p.heads[l], d)] = True
            layer.self_attn.o_proj.weight[:, ~keep_q] = 0
            layer.self_attn.o_proj.weight[drop_ch] = 0
            keep_n = torch.zeros(cfg.intermediate_size, dtype=torch.bool)
            keep_n[p.neurons[l]] = True
            layer.mlp.down_proj.weight[:, ~keep_n] = 0
            layer.mlp.down_proj.weight[drop_ch] = 0
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if lin.bias is not None:
                    lin.bias[drop_ch] = 0
    skip = [l for l in range(cfg.num_layers) if l not in p.layers]
    return ref, skip
