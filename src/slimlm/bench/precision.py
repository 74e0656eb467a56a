"""Equal-precision pairs: slimlm and llama.cpp (and transformers where it has the precision) on
the same weights at the same precision, one row each, for ``bench decode`` / ``bench prefill``
with ``--precisions fp32,bf16,int8,int4,gguf``.

| precision | slimlm | llama.cpp | transformers |
|---|---|---|---|
| fp32 | dtype float32 | F32 GGUF of the same weights | float32 |
| bf16 | dtype bfloat16 | BF16 GGUF | bfloat16 |
| int8 | weights int8 (symmetric, per channel) | Q8_0 (symmetric, groups of 32) | - |
| int4 | weights int4 (asymmetric, groups of 32) | Q4_1 (asymmetric, groups of 32) | - |
| gguf | weights gguf: the model's own GGUF, packed | the same GGUF file | - |

The int8 / int4 GGUFs are written from the same (de-quantized) weights slimlm quantizes; "gguf"
runs the very file both ways (the default model's is Q4_1 with a Q8_0 embedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.errors import SlimLMError

PRECISIONS: dict[str, tuple[str, str, str | None, str | None]] = {
    # name: (slimlm dtype, slimlm weights, llama.cpp GGUF type, transformers dtype)
    "fp32": ("float32", "auto", "F32", "float32"),
    "bf16": ("bfloat16", "auto", "BF16", "bfloat16"),
    "int8": ("float32", "int8", "Q8_0", None),
    "int4": ("float32", "int4", "Q4_1", None),
    "gguf": ("float32", "gguf", None, None),
}


def parse_precisions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise SlimLMError(f"unknown precision {', '.join(bad) or repr(text)}; valid: {', '.join(PRECISIONS)}")
    return names


def own_gguf(model: str) -> str:
    """The model's own GGUF file (a named model's packaged file, or the path itself)."""
    from slimlm.model.hub import KNOWN_MODELS, package_file

    if model in KNOWN_MODELS:
        return str(package_file(KNOWN_MODELS[model]))
    if str(model).endswith(".gguf") and Path(model).is_file():
        return str(model)
    raise SlimLMError(f"precision 'gguf' needs a GGUF model (a named model or a .gguf file), not {model}")


def precision_systems(a, s, extra: dict[str, Any]) -> tuple[dict[str, dict], list[str], dict[str, tuple[str, str]]]:
    """({label: worker args}, notes, {precision: (slimlm label, llama.cpp label)})."""
    from slimlm.bench.systems import gguf_for_llamacpp, unavailable

    systems: dict[str, dict] = {}
    notes: list[str] = []
    pairs: dict[str, tuple[str, str]] = {}
    base = s.base_args()
    for p in parse_precisions(a.precisions):
        dtype, weights, gtype, hf_dtype = PRECISIONS[p]
        engine = {**s.engine, "weights": weights}
        if "slimlm" not in s.skip:
            systems[f"slimlm {p}"] = {**base, **extra, "dtype": dtype, "engine": engine, "system": "slimlm"}
        if hf_dtype and "transformers" not in s.skip and not unavailable("transformers", s.model):
            systems[f"transformers {p}"] = {**base, **extra, "dtype": hf_dtype, "system": "transformers"}
        why = unavailable("llama.cpp", s.model)
        if "llama.cpp" in s.skip or why:
            notes += [why] if why and why not in notes else []
            continue
        path, quant = (own_gguf(s.model), "own") if gtype is None else gguf_for_llamacpp(s.model, gtype)
        label = f"llama.cpp {quant if gtype else Path(path).name}"
        systems[label] = {**base, **extra, "system": "llama.cpp", "gguf": path, "n_ctx": int(extra.get("n_ctx", 8192))}
        pairs[p] = (f"slimlm {p}", label)
    return systems, notes, pairs


def pair_ratios(summary: dict, pairs: dict[str, list[str]], metric: str, higher_is_better: bool) -> dict[str, float]:
    """{"int4 vs llama.cpp Q4_1": slimlm's ratio} from this run's medians."""
    out = {}
    for p, (mine, theirs) in pairs.items():
        a, b = summary.get(mine, {}).get(metric), summary.get(theirs, {}).get(metric)
        if a and b and a["median"] and b["median"]:
            out[f"{p} vs {theirs}"] = a["median"] / b["median"] if higher_is_better else b["median"] / a["median"]
    return out
