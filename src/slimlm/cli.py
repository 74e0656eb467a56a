"""The ``slimlm`` command line: each subcommand maps to one function below.

User mistakes (:class:`SlimLMError`, invalid parameters) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from slimlm.errors import SlimLMError


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def cmd_generate(args: argparse.Namespace) -> int:
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams
    from slimlm.model.hub import load

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop or [],
        repetition_penalty=args.repetition_penalty,
    )
    _threads(args.threads)
    lm = load(args.model, dtype=args.dtype)
    tok = lm.tokenizer
    if tok is None:
        raise SlimLMError(f"{args.model} has no tokenizer")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt_ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    else:
        prompt_ids = tok.encode(prompt)
    llm = LLM(lm, dtype=args.dtype, kv_cache_bytes=args.kv_cache_bytes)
    t0 = time.perf_counter()
    t_first, shown, n = None, 0, 0
    for out in llm.stream(prompt_ids, params):
        o = out.outputs[0]
        t_first = t_first or time.perf_counter()
        n = len(o.token_ids)
        sys.stdout.write(o.text[shown:])
        sys.stdout.flush()
        shown = len(o.text)
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    decode_s = time.perf_counter() - (t_first or t0)
    print(
        f"[{n} tokens in {dt:.2f} s: {n / dt:.1f} tok/s; prompt {len(prompt_ids)} tokens, "
        f"first token {((t_first or t0) - t0) * 1000:.0f} ms, decode {max(n - 1, 0) / max(decode_s, 1e-9):.1f} tok/s; "
        f"model load {lm.load_seconds:.2f} s]",
        file=sys.stderr,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from slimlm.model.hub import KNOWN_MODELS, cache_dir, cache_status

    print(f"{'name':<24} {'cache':<8} {'package':<24} description")
    for m in KNOWN_MODELS.values():
        try:
            status = cache_status(m, verify=args.verify)
        except SlimLMError:
            status = "no-pkg"
        pkg = f"{m.package.replace('_', '-')}=={m.version}"
        print(f"{m.name:<24} {status:<8} {pkg:<24} {m.description}")
        if args.verbose:
            print(f"{'':<24} {cache_dir(m)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from slimlm.model.hub import load
    from slimlm.model.weights import parse_dtype, save_model_dir

    lm = load(args.src)
    out = save_model_dir(lm.model, args.dst, lm.tokenizer, lm.generation_config, dtype=parse_dtype(args.dtype))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from slimlm.model.hub import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="slimlm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    g.add_argument("prompt", help="the prompt, or - to read it from stdin")
    g.add_argument("--model", default=DEFAULT_MODEL, help="known name, HF directory or .gguf file")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--kv-cache-bytes", type=int, default=256 << 20, help="KV pool for this one request")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the known model names and their cache")
    m.add_argument("--verify", action="store_true", help="check cache checksums")
    m.add_argument("-v", "--verbose", action="store_true")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("convert", help="write a model as a Hugging Face directory")
    c.add_argument("src", help="known name, HF directory or .gguf file")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32")
    c.set_defaults(func=cmd_convert)
    from slimlm.train.cli import register as register_train
    register_train(sub)
    from slimlm.bench.cli import register as register_bench

    register_bench(sub)
    from slimlm.serve.cli import register as register_serve

    register_serve(sub)
    from slimlm.eval.cli import register as register_eval
    register_eval(sub)
    from slimlm.compress.cli import register as register_compress
    register_compress(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SlimLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
