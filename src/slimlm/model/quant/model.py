"""Whole-model quantization: which modules are packed, how, and how a checkpoint records it.

``weights`` (``LLM(weights=...)``, ``--weights``) picks what the linear layers hold:

- ``"auto"``: as stored: a float checkpoint or a GGUF de-quantized into the model's dtype, a
  checkpoint written by ``slimlm quantize`` packed as it is;
- ``"int8"``: symmetric int8, one scale per output channel (or per ``group_size`` channels);
- ``"int4"``: asymmetric int4 in groups of ``group_size`` (default 32) input channels, a scale and
  a minimum per group;
- ``"gguf"``: a GGUF file's own quantization, kept packed (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).

The projections of every layer (``*_proj``, experts included) take the chosen format; the
embedding table and the output head take int8 per channel (as llama.cpp's Q4 files keep Q8_0
there), one tensor when they are tied. MoE routers and norms stay dense.

A quantized model's config carries ``quantization_config`` = ``{"quant_method": "slimlm",
"weights": ..., "modules": {name: [kind, group_size]}}``; ``prepare`` rebuilds the packed modules
from it before the state dict is assigned, so a missing scale is a missing tensor, named.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from slimlm.model.quant.formats import PackedWeight, check_group, quantize_int4, quantize_int8
from slimlm.model.quant.linear import QuantEmbedding, QuantLinear, _Packed

WEIGHTS = ("auto", "int8", "int4", "gguf", "gguf-strict")
"""Valid values of ``weights``. "gguf-strict" is "gguf" where a quantized type without a packed
kernel is an error instead of a de-quantized fallback with a warning."""
DEFAULT_GROUP = {"int4": 32, "int8": None}
HEAD_MODULES = ("model.embed_tokens", "lm_head")


def check_weights(weights: str | None, group_size: int | None = None) -> str:
    w = weights or "auto"
    if w not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    if group_size is not None and w not in ("int8", "int4"):
        raise ValueError(f"a group size applies to weights int8 or int4, not {w}")
    if group_size is not None and (group_size < 1 or (w == "int4" and group_size % 2)):
        raise ValueError(f"group size must be a positive{' even' if w == 'int4' else ''} integer, got {group_size}")
    return w


def packed_kind(weights: str) -> str:
    """The format ``weights`` loads as ("gguf-strict" is "gguf" with a stricter loader)."""
    return "gguf" if weights == "gguf-strict" else weights


def is_target(name: str) -> bool:
    """Module names that take the chosen format: the projections of every layer."""
    return name.startswith("model.layers.") and name.rsplit(".", 1)[-1].endswith("_proj")


CHUNK_ROWS = 1024
"""Rows quantized at a time: the fp32 temporaries of a 49k-row embedding stay small."""


def quantize_weight(name: str, w: torch.Tensor, weights: str, group_size: int | None) -> PackedWeight:
    """The packed form of weight ``name`` (a module name) under ``weights`` int8 / int4."""
    if w.shape[0] > CHUNK_ROWS:
        return pack_in_blocks(w.shape[0], lambda i, j: quantize_weight(name, w[i:j], weights, group_size))
    if name in HEAD_MODULES or weights == "int8":
        g = None if name in HEAD_MODULES else group_size
        if g is not None:
            check_group(w.shape[1], g, "int8", name)
        return quantize_int8(w, g)
    g = group_size or DEFAULT_GROUP["int4"]
    check_group(w.shape[1], g, "int4", name)
    return quantize_int4(w, g)


def pack_in_blocks(rows: int, block: Callable[[int, int], PackedWeight]) -> PackedWeight:
    """One packed weight of ``rows`` rows from ``block(i, j)`` (rows i..j-1 packed), CHUNK_ROWS at a
    time, each block copied into tensors allocated once: the whole weight exists once, never as a
    list of blocks next to their concatenation (SmolLM2's int8 embedding: 30 MiB less at the peak)."""
    first = block(0, min(CHUNK_ROWS, rows))
    kind, group = type(first), first.group_size
    out = {n: t.new_empty((rows, *t.shape[1:])) for n, t in first.tensors().items()}
    part: PackedWeight | None = first
    del first
    for i in range(0, rows, CHUNK_ROWS):
        part = part or block(i, min(i + CHUNK_ROWS, rows))
        for n, t in part.tensors().items():
            if t.dtype != out[n].dtype:  # a block's scales kept in float32 (beyond fp16's range): all of them
                out[n] = out[n].to(torch.promote_types(t.dtype, out[n].dtype))
            out[n][i:i + t.shape[0]] = t
        part = None
    return kind(out["qweight"], out["scales"], *([out["mins"]] if "mins" in out else []), group)


def quantize_model(model: nn.Module, weights: str, group_size: int | None = None) -> nn.Module:
    """Replace ``model``'s dense projections, embedding and head by packed ones, in place (the
    fp32 weights are released). Returns the model."""
    weights = check_weights(weights, group_size)
    if packed_kind(weights) == "gguf":
        raise ValueError("weights 'gguf' keeps a GGUF file's own quantization: load the .gguf with weights='gguf'")
    if weights == "auto":
        return model
    dtype = model.dtype
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n)]
    for n in targets:  # check every group size before changing anything
        if group_size is not None:
            check_group(_module(model, n).in_features, group_size, weights, n)
    for n in targets:
        lin = _module(model, n)
        _set(model, n, QuantLinear(quantize_weight(n, lin.weight, weights, group_size),
                                   None if lin.bias is None else lin.bias.detach()))
    emb = model.model.embed_tokens
    if isinstance(emb, nn.Embedding):
        tied = model.lm_head.weight is emb.weight
        q = QuantEmbedding(quantize_weight("model.embed_tokens", emb.weight, weights, group_size), dtype)
        model.model.embed_tokens = q
        head = model.lm_head
        model.lm_head = QuantLinear(q.packed() if tied else quantize_weight("lm_head", head.weight, weights, None))
        if tied:
            model.lm_head.share(q)
    record(model, weights)
    return model


def serve_weights(lm, weights: str, group_size: int | None = None):
    """``lm`` (a LoadedModel) holding ``weights``: a dense one is packed in place for int8 / int4;
    "auto" takes it as it is; any other mismatch is an error (re-packing packed weights would
    compound their rounding)."""
    weights = packed_kind(weights)
    if weights in ("auto", lm.weights):
        return lm
    if lm.weights == "dense" and weights in ("int8", "int4"):
        quantize_model(lm.model, weights, group_size)
        lm.weights = weights
        return lm
    raise ValueError(f"the model holds {lm.weights} weights; it cannot be served as {weights} "
                     f"(load it with weights={weights!r} instead)")


def record(model: nn.Module, weights: str) -> None:
    """Write the packed modules into the config (``quantization_config``)."""
    modules = {n: [m.kind, m.group_size] for n, m in model.named_modules() if isinstance(m, _Packed)}
    model.cfg.extra["quantization_config"] = {"quant_method": "slimlm", "weights": weights, "modules": modules}


def spec(cfg) -> dict[str, Any] | None:
    q = cfg.extra.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "slimlm" or not isinstance(q.get("modules"), dict):
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ValueError(f"quantization_config with quant_method {method!r} is not supported; "
                         "slimlm reads its own ('slimlm', written by slimlm quantize)")
    return q


def prepare(model: nn.Module, modules: dict[str, list]) -> None:
    """Replace the named modules (on the meta device) by empty packed ones of the recorded kind."""
    cfg = model.cfg
    for name, (kind, group) in modules.items():
        old = _module(model, name)
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantEmbedding.empty(kind, old.num_embeddings, old.embedding_dim, group)
        elif isinstance(old, nn.Linear):
            new = QuantLinear.empty(kind, old.out_features, old.in_features, group, old.bias is not None)
        else:
            raise ValueError(f"quantization_config names {name}, which is not a linear layer or embedding")
        _set(model, name, new)
    if cfg.tie_word_embeddings and isinstance(model.model.embed_tokens, QuantEmbedding):
        e = model.model.embed_tokens
        model.lm_head = QuantLinear.empty(e.kind, e.out_features, e.in_features, e.group_size, False)


def finish(model: nn.Module, dtype: torch.dtype) -> None:
    """After the state is assigned: scales / minimums of a dtype the kernels do not read widened to
    float32, tie the head to the embedding, set lookup dtypes."""
    from slimlm.model.quant.formats import SCALE_DTYPES

    for m in model.modules():
        if isinstance(m, _Packed):
            for name in ("scales", "mins"):
                t = m._buffers.get(name)
                if t is not None and t.dtype not in SCALE_DTYPES:
                    setattr(m, name, t.float())
    emb = model.model.embed_tokens
    if isinstance(emb, QuantEmbedding):
        emb.dtype = dtype
        if model.cfg.tie_word_embeddings:
            model.lm_head.share(emb)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The de-quantized model (in place): every packed module back to nn.Linear / nn.Embedding
    holding exactly the values the packed one computes with: the reference of the tests."""
    dtype = dtype or model.dtype
    for n, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and n != "lm_head":
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.packed().dequantize(dtype), requires_grad=False)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
            _set(model, n, lin)
    emb, head = model.model.embed_tokens, model.lm_head
    if isinstance(emb, QuantEmbedding):
        model.model.embed_tokens = nn.Embedding.from_pretrained(emb.packed().dequantize(dtype), freeze=True)
    if isinstance(head, QuantLinear):
        lin = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        lin.weight = (model.model.embed_tokens.weight if model.cfg.tie_word_embeddings
                      else nn.Parameter(head.packed().dequantize(dtype), requires_grad=False))
        model.lm_head = lin
    model.cfg.extra.pop("quantization_config", None)
    return model


def packed_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each tensor counted once (tied ones too)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def warn(msg: str) -> None:
    print(f"slimlm: warning: {msg}", file=sys.stderr)


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
