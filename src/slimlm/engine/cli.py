"""`slimlm generate` (one prompt, streamed) and `slimlm chat` (an interactive conversation)."""

from __future__ import annotations

import argparse
import re
import sys
import time

from slimlm.errors import SlimLMError

SAMPLING_NOTE = """\
Sampling defaults here (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, as llama.cpp's CLI)
are for reading text; SamplingParams() and the HTTP API keep vLLM's / OpenAI's defaults
(temperature 1.0, no top-k/top-p/min-p, max_tokens 16) so API clients get what they expect.
--temperature 0 is greedy. Escapes \\n \\t \\r \\\\ in --stop and --system are decoded."""

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}


def unescape(text: str) -> str:
    r"""Decode \n \t \r \\ \0 typed on the command line (``--stop "\n\n"``); other text is kept."""
    return re.sub(r"\\([nrt0\\])", lambda m: _ESCAPES[m.group(1)], text)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k likeliest tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's penalty (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string, escapes decoded (repeatable)")


def sampling_params(a: argparse.Namespace):
    from slimlm.engine.params import SamplingParams

    return SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        seed=a.seed, stop=[unescape(s) for s in a.stop or []], repetition_penalty=a.repetition_penalty,
    )


def _load(a: argparse.Namespace):
    import os

    import torch

    from slimlm.model.hub import load

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    lm = load(a.model, a.dtype, a.device, a.weights, a.weights_group_size)
    if lm.tokenizer is None:
        raise SlimLMError(f"{a.model} has no tokenizer (tokenizer.json); generate and chat need one")
    return lm


def _llm(a: argparse.Namespace, lm, need_tokens: int | None):
    """The engine on ``lm``; its KV pool defaults to what ``need_tokens`` (None: the whole
    context) needs, rather than a share of free memory."""
    from slimlm.engine.llm import LLM
    from slimlm.engine.options import engine_config_from_args
    from slimlm.kvcache.spec import KVCacheSpec
    engine = engine_config_from_args(a)
    if engine["kv_cache_bytes"] is None:
        tokens = min(need_tokens or lm.config.context_length, lm.config.context_length) + 1
        spec = KVCacheSpec.from_model(lm.config, lm.model.dtype, engine.get("kv_cache_dtype", "auto"))
        need = spec.bytes_per_block(engine["block_size"]) * -(-tokens // engine["block_size"])
        if engine.get("speculative"):  # the proposer takes its share of the pool first
            need = int(need / (1 - float(engine.get("speculative_args", {}).get("kv_fraction", 0.2)))) + 1
        engine["kv_cache_bytes"] = need
    return LLM(lm, **engine)


def read_prompt(a: argparse.Namespace) -> str:
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    if not prompt.strip():
        raise SlimLMError("the prompt is empty" + (" (nothing came on stdin)" if a.prompt == "-" else ""))
    return prompt


def cmd_generate(a: argparse.Namespace) -> int:
    params = sampling_params(a)
    prompt = read_prompt(a)
    lm = _load(a)
    tok = lm.tokenizer
    if a.chat:
        messages = ([{"role": "system", "content": unescape(a.system)}] if a.system else [])
        prompt_ids = tok.encode(tok.apply_chat_template(messages + [{"role": "user", "content": prompt}]),
                                add_special_tokens=False)
    else:
        prompt_ids = tok.encode(prompt)
    llm = _llm(a, lm, len(prompt_ids) + params.max_tokens)
    t0 = time.perf_counter()
    t_first, n = None, 0
    for out in llm.stream(prompt_ids, params):
        o = out.outputs[0]
        if o.token_ids and t_first is None:
            t_first = time.perf_counter()
        n += len(o.token_ids)
        sys.stdout.write(o.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    decode_s = time.perf_counter() - (t_first or t0)
    print(
        f"[{_n(n, 'token')} in {dt:.2f} s: {n / dt:.1f} tok/s; prompt {_n(len(prompt_ids), 'token')}, "
        f"first token {((t_first or t0) - t0) * 1000:.0f} ms, decode {max(n - 1, 0) / max(decode_s, 1e-9):.1f} tok/s; "
        f"model load {lm.load_seconds:.2f} s; {_precision(a, lm)}]",
        file=sys.stderr,
    )
    return 0


def _precision(a: argparse.Namespace, lm) -> str:
    """The dtype (and how "auto" chose it) and the weights' format, for the stats line."""
    dtype = str(lm.model.dtype).removeprefix("torch.")
    if a.dtype == "auto":
        from slimlm.model.dtype_auto import NATIVE_BF16_FLAGS

        why = "native bf16" if dtype == "bfloat16" else f"no {' / '.join(NATIVE_BF16_FLAGS)}"
        dtype = f"dtype auto -> {dtype} ({why})"
    else:
        dtype = f"dtype {dtype}"
    return f"{dtype}, weights {lm.weights}"


def cmd_chat(a: argparse.Namespace) -> int:
    from slimlm.engine.chat import ChatSession, repl

    params = sampling_params(a)
    llm = _llm(a, _load(a), None)
    session = ChatSession(llm, params, system=unescape(a.system) if a.system else None)
    session._fit()  # a missing chat template fails here, before the first prompt
    return repl(session, show_stats=a.stats)


def register(sub: argparse._SubParsersAction) -> None:
    from slimlm.engine.options import add_engine_args
    from slimlm.model.hub import DEFAULT_MODEL

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate text from one prompt, streamed to stdout; timings on stderr.",
                       epilog=SAMPLING_NOTE)
    g.add_argument("prompt", help="the prompt, or - to read it from stdin")
    g.add_argument("--model", default=DEFAULT_MODEL, help="known name, HF directory, run folder or .gguf file")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_args(g, max_tokens=128)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk with a model in the terminal (multi-turn, streaming)",
                       description="An interactive conversation: the chat template over the whole history, "
                                   "replies streamed. Commands: /reset, /system TEXT, /stats [on|off], /help, /exit.",
                       epilog=SAMPLING_NOTE)
    c.add_argument("--model", default=DEFAULT_MODEL, help="known name, HF directory, run folder or .gguf file")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--stats", action="store_true", help="print token counts and speed after every reply")
    add_sampling_args(c, max_tokens=512)
    add_engine_args(c)
    c.set_defaults(func=cmd_chat)
