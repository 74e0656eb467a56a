"""Packed low-bit weights: formats (formats.py), modules (linear.py), whole-model quantization
and its checkpoint record (model.py), packing while loading (load.py), GGUF blocks as they are
(gguf_packed.py). See docs/architecture.md, "How to add a weight format"."""

from slimlm.model.quant.formats import Int4Weight, Int8Weight, PackedWeight, quantize_int4, quantize_int8
from slimlm.model.quant.linear import QuantEmbedding, QuantLinear
from slimlm.model.quant.model import (
    WEIGHTS, check_weights, dequantize_model, finish, packed_bytes, prepare, quantize_model, spec,
)


def packed_keys(model) -> set[str]:
    """State-dict keys of packed buffers (never cast to the model's dtype)."""
    from slimlm.model.quant.linear import _Packed

    keys: set[str] = set()
    for n, m in model.named_modules():
        if isinstance(m, _Packed):
            keys.update(f"{n}.{b}" for b in ("qweight", "scales", "mins"))
    return keys


__all__ = [
    "Int4Weight", "Int8Weight", "PackedWeight", "QuantEmbedding", "QuantLinear", "WEIGHTS", "check_weights",
    "dequantize_model", "finish", "packed_bytes", "packed_keys", "prepare", "quantize_int4", "quantize_int8",
    "quantize_model", "spec",
]
