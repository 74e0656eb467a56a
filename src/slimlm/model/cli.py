"""`slimlm models` (known names and their cache) and `slimlm convert` (write an HF directory)."""

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

    lm = load(a.src)
    out = save_model_dir(lm.model, a.dst, lm.tokenizer, lm.generation_config, dtype=parse_dtype(a.dtype))
    print(f"wrote {out}", file=sys.stderr)
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
