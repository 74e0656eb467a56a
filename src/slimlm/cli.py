"""The ``slimlm`` command line: each subcommand maps to one function in its package's ``cli.py``.

User mistakes (:class:`SlimLMError`, invalid parameters) print one ``error:`` line and exit 2;
a mistyped flag or subcommand prints that subcommand's usage and the closest valid name.

How to add a subcommand: write ``register(sub)`` in your package's ``cli.py`` (``sub.add_parser(
NAME, help=...)``, flags with help, ``set_defaults(func=cmd_NAME)``) and add the module to
:data:`SUBCOMMANDS`. Every ``--help`` shows defaults; engine flags come from
``engine.options.add_engine_args``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

from slimlm.errors import SlimLMError

SUBCOMMANDS = [
    "slimlm.engine.cli",  # generate, chat
    "slimlm.model.cli",  # models, convert
    "slimlm.train.cli",  # train, data, tokenizer, schedule
    "slimlm.bench.cli",  # bench
    "slimlm.serve.cli",  # serve
    "slimlm.batch.cli",  # batch
    "slimlm.compress.cli",  # prune, distill, distill-cache, lowrank, finetune, extend-vocab, select, rationales, draft-bench
    "slimlm.compress.spec_cli",  # train-adapter, skipdecode-tune, spec-bench
    "slimlm.eval.cli",  # eval, report
    "slimlm.kvcache.cli",  # compress-kv
]
"""Modules with a ``register(subparsers)`` function, in the order ``slimlm --help`` lists them."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it is None / False) and keeps descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "%(default)" in help_ or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return help_
        if isinstance(action.default, list) and not action.default:
            return help_
        return help_ + " (default: %(default)s)"


class SlimParser(argparse.ArgumentParser):
    """argparse with the subcommand's own usage for unknown flags, and "did you mean" hints."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras:  # report here, so the usage is this (sub)command's, not the top level's
            self.error(self._unrecognized(extras))
        return ns, extras

    def _unrecognized(self, extras: list[str]) -> str:
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        first = extras[0]
        msg = f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
        if first.startswith("-"):
            close = difflib.get_close_matches(first.split("=", 1)[0], flags, n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean {close[0]}?"
        return msg

    def error(self, message: str):
        kinds = {"int": "an integer", "float": "a number"}
        message = re.sub(r"invalid (int|float) value: ('.*')",
                         lambda m: f"invalid value {m.group(2)}: expected {kinds[m.group(1)]}", message)
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {message}\n")

    def short_usage(self) -> str:
        """One usage line: the positionals, and where the options are listed."""
        pos = [a.metavar or a.dest for a in self._actions if not a.option_strings and a.help != argparse.SUPPRESS]
        return f"usage: {self.prog} [options] {' '.join(map(str, pos))}  ({self.prog} --help lists the options)"


def build_parser() -> argparse.ArgumentParser:
    from slimlm import __version__

    p = SlimParser(prog="slimlm", description="Serve, compress and train small language models "
                                              "(slimlm --help; slimlm COMMAND --help for a command's options).")
    p.add_argument("--version", action="version", version=f"slimlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (SlimLMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
