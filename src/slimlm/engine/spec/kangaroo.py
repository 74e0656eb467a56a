"""Kangaroo: self-speculative decoding with a double early exit (Liu et al. 2024).

The draft is a shallow sub-network of the target itself: its first ``exit_layer`` decoder
layers (shared weights, nothing copied) followed by a small trained *adapter* — one attention
block between two RMSNorms, as in the paper — and the target's own LM head. The adapter is the
only trained part (``slimlm train-adapter --method kangaroo``, target frozen).

Double early exit: the draft exits the target early (first exit, at ``exit_layer``), and
drafting for a sequence stops as soon as the draft's top-1 probability falls below
``threshold`` (second exit), so hard tokens go straight to the target. Verification is the
ordinary lossless one (greedy: identical output; sampled: Leviathan et al.'s rule).

Choices documented here:

- The draft keeps its own paged KV (``exit_layer`` + 1 layers, a slice of the engine's KV
  budget) instead of reading the target's first layers' KV in place: the proposer never holds
  the engine's cache. The draft cache keeps every token it drafted that the target accepted,
  so only the target's bonus token is recomputed by the shallow layers each step.
- ``head_vocab``: the adapter may score only the S most frequent tokens of its training text
  (a row subset of the LM head; S is stored with the adapter). On a 49k-token vocabulary the
  LM head is most of a shallow draft's cost; tokens outside the subset are never drafted, and
  verification stays lossless because the target scores every token.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimlm.engine.spec.base import SPEC_METHODS, ProposerContext
from slimlm.engine.spec.draft_model import DraftModelProposer
from slimlm.errors import SlimLMError
from slimlm.model.transformer import Attention, CausalLM, RMSNorm

if TYPE_CHECKING:
    from slimlm.engine.request import Sequence

ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


class KangarooAdapter(nn.Module):
    """One attention block (Pre-LN, residual) and the norm before the LM head. Its attention
    is layer ``exit_layer`` of the draft's KV cache."""

    def __init__(self, cfg, exit_layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, exit_layer)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn, plan=None):
        rows = None if plan is None else plan.q_rows
        a = self.self_attn(self.input_layernorm(x), cos, sin, attn, rows)
        return x + a if rows is None else x.index_add(1, rows, a)

    @classmethod
    def from_target(cls, target: CausalLM, exit_layer: int) -> KangarooAdapter:
        """Initialized from the target's layer ``exit_layer`` attention and its final norm."""
        ad = cls(target.cfg, exit_layer).to(target.dtype)
        src = target.model.layers[exit_layer]
        ad.self_attn.load_state_dict(src.self_attn.state_dict())
        ad.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
        ad.norm.load_state_dict(target.model.norm.state_dict())
        return ad


class _Backbone(nn.Module):
    def __init__(self, embed_tokens, layers, norm):
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed_tokens, layers, norm


class ShallowLM(nn.Module):
    """The draft network: the target's first ``exit_layer`` layers + the adapter + the LM head
    (rows ``token_map`` only, when a vocabulary subset is used). It has the interface the
    model runner uses (embed, layers, head, rotary, windows)."""

    def __init__(self, target: CausalLM, adapter: KangarooAdapter, exit_layer: int,
                 token_map: torch.Tensor | None = None):
        super().__init__()
        self.cfg = dataclasses.replace(target.cfg, num_layers=exit_layer + 1)
        layers = nn.ModuleList(list(target.model.layers[:exit_layer]) + [adapter])
        self.model = _Backbone(target.model.embed_tokens, layers, adapter.norm)
        w = target.lm_head.weight
        self.head_weight = w if token_map is None else w.detach().index_select(0, token_map.to(w.device))
        self.rotary, self.attn_scale = target.rotary, target.attn_scale
        self.exit_layer = exit_layer

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    def windows(self) -> dict[int, int | None]:
        return {i: self.cfg.window_for_layer(i) for i in range(self.cfg.num_layers)}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.model.norm(h), self.head_weight)


def check_exit_layer(exit_layer: int, num_layers: int) -> None:
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < num_layers:
        raise SlimLMError(f"exit layer {exit_layer} is outside the model: it must be in 1..{num_layers - 1} "
                          f"(the model has {num_layers} layers)")


def check_threshold(name: str, value: float, lo: float = 0.0, hi: float = 1.0) -> None:
    if not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise SlimLMError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")


def save_adapter(out: str | Path, method: str, adapter: nn.Module, meta: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps({"method": method, **meta}, indent=1))
    return out


def load_adapter(path: str | Path | None, method: str, target: CausalLM) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, state dict) of a trained adapter folder; one-line errors when missing or foreign."""
    from safetensors.torch import load_file

    if path is None:
        raise SlimLMError(f"speculative={method!r} needs a trained adapter: speculative_args={{'adapter': DIR}} "
                          f"(--speculative-arg adapter=DIR); train one with `slimlm train-adapter --method {method}`")
    p = Path(path).expanduser()
    if not (p / ADAPTER_CONFIG).is_file() or not (p / ADAPTER_WEIGHTS).is_file():
        raise SlimLMError(f"'{path}' is not a trained adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); "
                          f"train one with `slimlm train-adapter --method {method}`")
    meta = json.loads((p / ADAPTER_CONFIG).read_text())
    if meta.get("method") != method:
        raise SlimLMError(f"adapter '{path}' was trained for {meta.get('method')!r}, not {method!r}")
    cfg = target.cfg
    want = {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise SlimLMError(f"adapter '{path}' was trained for another model ({got}); this target has {want}")
    state = {k: v.to(target.dtype) for k, v in load_file(str(p / ADAPTER_WEIGHTS), device=str(target.device)).items()}
    return meta, state


@SPEC_METHODS.register("kangaroo")
class KangarooProposer(DraftModelProposer):
    def __init__(self, ctx: ProposerContext, adapter: str | None = None, k: int = 6, threshold: float = 0.6,
                 kv_fraction: float = 0.1, tree: bool = False, max_batch: int | None = None,
                 cumulative: bool = False):
        """``adapter``: folder written by ``slimlm train-adapter --method kangaroo``; ``k``: most
        drafts per step; ``threshold``: drafting stops when the draft's top-1 probability falls
        below it (0 = never stop early); ``cumulative``: compare the product of the draft's top-1
        probabilities so far instead (the chance the whole chain is right); ``max_batch``: no
        drafting in steps with more decoding sequences."""
        from slimlm.model.hub import LoadedModel

        check_threshold("kangaroo threshold", threshold)
        meta, state = load_adapter(adapter, "kangaroo", ctx.target)
        exit_layer = int(meta["exit_layer"])
        check_exit_layer(exit_layer, ctx.target.cfg.num_layers)
        ad = KangarooAdapter(ctx.target.cfg, exit_layer).to(device=ctx.target.device, dtype=ctx.target.dtype)
        ad.load_state_dict(state)
        ad.requires_grad_(False)
        token_map = meta.get("token_map")
        tm = torch.tensor(token_map, dtype=torch.long, device=ctx.target.device) if token_map else None
        shallow = ShallowLM(ctx.target, ad, exit_layer, tm)
        self.threshold = float(threshold)
        super().__init__(ctx, LoadedModel(shallow, None, Path(adapter)), k=k, kv_fraction=kv_fraction, tree=tree,
                         max_batch=max_batch)
        self.token_map = tm
        self.cumulative = bool(cumulative)
        self.confidence: dict[int, float] = {}  # seq -> product of its draft's top-1 probabilities

    def _stop(self, seq: Sequence, row: torch.Tensor, step: int) -> bool:
        if self.threshold <= 0.0:
            return False
        p = float(row[0].float().softmax(-1).max())
        if self.cumulative:
            p *= self.confidence.get(seq.seq_id, 1.0) if step > 0 else 1.0
            self.confidence[seq.seq_id] = p
        return p < self.threshold

    def release(self, seq: Sequence) -> None:
        super().release(seq)
        self.confidence.pop(seq.seq_id, None)
