"""Engine options on the command line: one definition for every subcommand (generate, chat,
serve, bench, eval), derived from :class:`EngineConfig`'s fields.

Each field becomes a flag named after it; its docstring is the help, its default is shown, its
type decides how the value is read:

- ``bool`` defaulting to True -> ``--no-NAME`` (``enable_`` dropped: ``--no-prefix-caching``);
  defaulting to False -> ``--NAME``;
- ``int`` / ``float`` / ``str`` -> ``--NAME VALUE``; a name ending in ``_bytes`` takes sizes
  (``512M``, ``2G``); a field in :data:`CHOICES` lists and checks its valid names;
- ``list[str]`` -> a repeatable flag in the singular (``hooks`` -> ``--hook NAME``);
- ``dict`` ending in ``_args`` -> repeatable ``--NAME-arg K=V`` (``kv_policy_args`` ->
  ``--kv-policy-arg``); ``hook_args`` takes ``--hook-arg HOOK.K=V``.

How to add an engine option: add a typed, documented field to ``EngineConfig``; it appears
here by itself. If its values are names from a registry, add the field to :data:`CHOICES`. A
subcommand that already has a flag of the same name (``generate --seed``) keeps its own.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from functools import cache
from typing import Any

from slimlm.engine.config import EngineConfig, parse_size
from slimlm.errors import SlimLMError


def _dtypes() -> list[str]:
    from slimlm.model.weights import DTYPES

    return ["auto", *DTYPES]


def _registry(module: str, attr: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        import importlib

        return getattr(importlib.import_module(module), attr).names()

    return names


CHOICES: dict[str, Callable[[], list[str]]] = {
    "dtype": _dtypes,
    "kv_policy": _registry("slimlm.kvcache.policy", "KV_POLICIES"),
    "speculative": _registry("slimlm.engine.spec", "SPEC_METHODS"),
    "hooks": _registry("slimlm.engine.hooks", "LAYER_HOOKS"),
    "kv_cache_dtype": _registry("slimlm.kvcache.codec", "KV_CODECS"),
    "rope_extension": _registry("slimlm.model.rope_extension", "ROPE_EXTENSIONS"),
    "sparse_prefill": _registry("slimlm.engine.sparse_prefill", "SPARSE_PREFILL"),
    "weights": lambda: list(__import__("slimlm.model.quant", fromlist=["WEIGHTS"]).WEIGHTS),
}
"""Fields whose values are names: field -> a function listing the valid ones."""

HELP = {
    "device": "torch device (cpu, cuda, cuda:1, ...)",
    "kv_policy_args": "settings of --kv-policy (e.g. window=256)",
    "speculative_args": "settings of --speculative (e.g. model=PATH k=4)",
    "rope_extension_args": "settings of --rope-extension (e.g. context=32768 chunk_size=6144 local_window=384)",
    "sparse_prefill_args": "settings of --sparse-prefill (e.g. vertical=1024 slash=1024 local=256 min_keys=4096)",
    "hook_args": "settings of a --hook (e.g. ffn_skip.layers=[3,4])",
    "seed": "engine seed (sampling without a per-request seed)",
}
"""Help for fields that carry no docstring in EngineConfig (a docstring there wins)."""


@cache
def field_docs(cls: type = EngineConfig) -> dict[str, str]:
    """The docstring under each field of a dataclass (the first sentence, one line)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            text = " ".join(nxt.value.value.split()).replace("``", "")
            docs[node.target.id] = text.rstrip(".").replace("%", "%%")
    return docs


def _flag(name: str, kind: str) -> tuple[str, str]:
    """(flag, dest) for a field."""
    if kind == "bool_true":
        base = name.removeprefix("enable_")
        return f"--no-{base.replace('_', '-')}", f"no_{base}"
    if kind == "list":
        base = name.removesuffix("s")
        return f"--{base.replace('_', '-')}", base
    if kind == "dict":
        base = name.removesuffix("s")
        return f"--{base.replace('_', '-')}", base
    return f"--{name.replace('_', '-')}", name


def _kind(name: str, hint: Any, default: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is bool:
        return "bool_true" if default else "bool_false"
    if origin is list:
        return "list"
    if origin is dict:
        return "dict"
    return "value"


def _scalar(hint: Any) -> type:
    """int / float / str out of ``int | None`` and the like."""
    args = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    for t in (int, float, str):
        if t in args:
            return t
    return str


def _choice_type(name: str, valid: Callable[[], list[str]]) -> Callable[[str], str]:
    def check(value: str) -> str:
        names = valid()
        if value not in names:
            import difflib

            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise argparse.ArgumentTypeError(f"invalid choice {value!r}{hint}; valid: {', '.join(names)}")
        return value

    check.__name__ = name
    return check


def _size(value: str) -> int:
    try:
        return parse_size(value, "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _typed(t: type) -> Callable[[str], Any]:
    what = {int: "an integer", float: "a number"}.get(t, f"a {t.__name__}")

    def read(value: str) -> Any:
        try:
            return t(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None

    read.__name__ = t.__name__
    return read


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Add a flag for every EngineConfig field (and ``--threads``) that ``p`` does not define yet."""
    hints = typing.get_type_hints(EngineConfig)
    docs = field_docs()
    g = p.add_argument_group("engine", "options of the serving engine (EngineConfig; see docs/architecture.md)")
    taken = set(p._option_string_actions)  # argparse has no public accessor
    added: list[str] = []
    for f in fields(EngineConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = _kind(f.name, hints[f.name], default)
        flag, dest = _flag(f.name, kind)
        if flag in taken:
            continue
        help_ = docs.get(f.name) or HELP.get(f.name, f.name.replace("_", " "))
        valid = CHOICES.get(f.name)
        if valid:
            help_ += f"; one of: {', '.join(valid())}"
        if kind == "bool_true":
            g.add_argument(flag, dest=dest, action="store_true", help=f"turn off: {help_}")
        elif kind == "bool_false":
            g.add_argument(flag, dest=dest, action="store_true", help=help_)
        elif kind == "list":
            g.add_argument(flag, dest=dest, action="append", metavar="NAME", help=help_ + " (repeatable)",
                           type=_choice_type(f.name, valid) if valid else str)
        elif kind == "dict":
            meta = "NAME.K=V" if f.name == "hook_args" else "K=V"
            g.add_argument(flag, dest=dest, action="append", metavar=meta, help=help_ + " (repeatable)")
        elif f.name.endswith("_bytes"):
            g.add_argument(flag, dest=dest, type=_size, default=default, metavar="SIZE",
                           help=help_ + " (bytes, or 512M, 2G)")
        else:
            t = _choice_type(f.name, valid) if valid else _typed(_scalar(hints[f.name]))
            g.add_argument(flag, dest=dest, type=t, default=default, help=help_)
        added.append(f.name)
    if "--threads" not in taken:
        g.add_argument("--threads", type=_typed(int), default=None, help="CPU threads (default: all cores)")
    p.set_defaults(engine_fields=tuple(added))


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


def _nested_kv(items: list[str] | None, flag: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name_kv in items or []:
        name, dot, kv = name_kv.partition(".")
        if not dot or "=" not in kv:
            raise SlimLMError(f"{flag} expects NAME.KEY=VALUE, got {name_kv!r}")
        out.setdefault(name, {}).update(_kv([kv], flag))
    return out


def engine_config_from_args(a: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for EngineConfig / LLM from the flags ``add_engine_args`` added."""
    hints = typing.get_type_hints(EngineConfig)
    out: dict[str, Any] = {}
    for f in fields(EngineConfig):
        if f.name not in getattr(a, "engine_fields", ()):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = _kind(f.name, hints[f.name], default)
        flag, dest = _flag(f.name, kind)
        v = getattr(a, dest)
        if kind == "bool_true":
            out[f.name] = not v
        elif kind == "list":
            out[f.name] = list(v or [])
        elif kind == "dict":
            out[f.name] = _nested_kv(v, flag) if f.name == "hook_args" else _kv(v, flag)
        else:
            out[f.name] = v
    return out


def engine_settings(a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(dtype, the engine keywords that are set), for bench and eval."""
    engine = engine_config_from_args(a)
    from slimlm.model.dtype_auto import resolve_dtype

    dtype = resolve_dtype(engine.pop("dtype", EngineConfig.dtype), engine.get("device", "cpu"))
    return dtype, {k: v for k, v in engine.items() if v not in (None, {}, [])}
