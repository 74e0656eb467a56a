"""`slimlm models` (known names and their cache), `slimlm convert` (write an HF directory) and
`slimlm quantize` (write a checkpoint with packed int8 / int4 weights)."""

from __future__ import annotations

import argparse
import sys

from slimlm.errors import SlimLMError


def cmd_models(a: argparse.Namespace) -> int:
    from slimlm.model.hub import KNOWN_MODELS, cache_dir, cache_status

    print(f"{'name':<24} {'cache':<8} {'package':<24} description")
    for m in KNOWN_MODELS.values():
        try:
            status = cache_status(m, verify=a.verify)
        except SlimLMError:
            status = "no-pkg"
        pkg = f"{m.package.replace('_', '-')}=={m.version}"
        print(f"{m.name:<24} {status:<8} {pkg:<24} {m.description}")
        if a.verbose:
            print(f"{'':<24} {cache_dir(m)}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from slimlm.model.hub import load
    from slimlm.model.weights import parse_dtype, save_model_dir

    from slimlm.model.quant import dequantize_model

    lm = load(a.src)
    if lm.weights != "dense":  # a quantized checkpoint: written de-quantized, for transformers
        dequantize_model(lm.model)
    out = save_model_dir(lm.model, a.dst, lm.tokenizer, lm.generation_config, dtype=parse_dtype(a.dtype))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from slimlm.model.hub import load
    from slimlm.model.quant import packed_bytes
    from slimlm.model.weights import save_model_dir

    lm = load(a.src, weights=a.weights, group_size=a.group_size)
    out = save_model_dir(lm.model, a.dst, lm.tokenizer, lm.generation_config)
    q = lm.model.cfg.extra.get("quantization_config", {})
    kinds = sorted({f"{k} g{g}" for k, g in q.get("modules", {}).values()})
    print(f"wrote {out}: {len(q.get('modules', {}))} packed modules ({', '.join(kinds)}), "
          f"{packed_bytes(lm.model) / 2**20:.1f} MiB of weights", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from slimlm.model.weights import DTYPES

    m = sub.add_parser("models", help="list the known model names and their cache")
    m.add_argument("--verify", action="store_true", help="check cache checksums")
    m.add_argument("-v", "--verbose", action="store_true", help="also print each cache folder")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("convert", help="write a model as a Hugging Face directory")
    c.add_argument("src", help="known name, HF directory or .gguf file")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written weights")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="write a checkpoint with packed int8 / int4 weights (safetensors + config)")
    q.add_argument("src", help="known name, HF directory or .gguf file")
    q.add_argument("dst", help="output directory (slimlm loads it packed; `slimlm convert` de-quantizes it)")
    q.add_argument("--weights", required=True, choices=["int8", "int4", "gguf"],
                   help="int8: symmetric, per output channel (or group); int4: asymmetric groups; "
                        "gguf: a GGUF's own quantization as it is")
    q.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale (int4 default 32; int8 default: the whole row)")
    q.set_defaults(func=cmd_quantize)
