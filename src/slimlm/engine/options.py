"""Engine options on the command line, shared by `serve`, `bench` and `eval`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slimlm.errors import SlimLMError


def _kv(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SlimLMError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def add_engine_args(p: argparse.ArgumentParser) -> None:
    from slimlm.engine.hooks import LAYER_HOOKS
    from slimlm.engine.spec import SPEC_METHODS
    from slimlm.kvcache.policy import KV_POLICIES

    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-bytes", type=int, default=None, help="KV pool size (default: from free memory)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step (chunk size)")
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--no-batch-prefix-scheduling", action="store_true", help="disable BatchLLM ordering")
    g.add_argument("--kv-policy", default=None, help=f"one of: {', '.join(KV_POLICIES.names())}")
    g.add_argument("--kv-policy-arg", action="append", metavar="K=V")
    g.add_argument("--speculative", default=None, help=f"one of: {', '.join(SPEC_METHODS.names())}")
    g.add_argument("--speculative-arg", action="append", metavar="K=V", help="e.g. model=PATH k=4")
    g.add_argument("--hook", action="append", help=f"one of: {', '.join(LAYER_HOOKS.names())}")
    g.add_argument("--hook-arg", action="append", metavar="HOOK.K=V", help="e.g. lazyllm.keep=[0.5,0.25]")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto, float32, bfloat16, float16, int8, int4")
    g.add_argument("--no-native-kernels", action="store_true", help="PyTorch ops only (no compiled CPU kernels)")
    g.add_argument("--threads", type=int, default=None)


def engine_config_from_args(a: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for EngineConfig / LLM, validated by name against the registries."""
    from slimlm.engine.hooks import LAYER_HOOKS
    from slimlm.engine.spec import SPEC_METHODS
    from slimlm.kvcache.policy import KV_POLICIES

    if a.kv_policy:
        KV_POLICIES.get(a.kv_policy)
    if a.speculative:
        SPEC_METHODS.get(a.speculative)
    for h in a.hook or []:
        LAYER_HOOKS.get(h)
    from slimlm.kvcache.codec import KV_CODECS

    KV_CODECS.get(a.kv_cache_dtype)
    hook_args: dict[str, dict[str, Any]] = {}
    for k, v in _kv(a.hook_arg, "--hook-arg").items():
        if "." not in k:
            raise SlimLMError(f"--hook-arg expects HOOK.KEY=VALUE, got {k!r}")
        name, key = k.split(".", 1)
        hook_args.setdefault(name, {})[key] = v
    return dict(
        dtype=a.dtype, block_size=a.block_size, kv_cache_bytes=a.kv_cache_bytes,
        max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
        enable_prefix_caching=not a.no_prefix_caching, batch_prefix_scheduling=not a.no_batch_prefix_scheduling,
        kv_policy=a.kv_policy, kv_policy_args=_kv(a.kv_policy_arg, "--kv-policy-arg"),
        speculative=a.speculative, speculative_args=_kv(a.speculative_arg, "--speculative-arg"),
        hooks=list(a.hook or []), hook_args=hook_args, native_kernels=not a.no_native_kernels,
        kv_cache_dtype=a.kv_cache_dtype,
    )
