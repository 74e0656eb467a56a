"""Command-line conventions: subcommand usage and "did you mean" on typos, defaults and choices
in every --help, --version, sizes, escapes, one-line errors for bad input."""

from __future__ import annotations

import argparse
import io
import os

import pytest

from slimlm.cli import HelpFormatter, build_parser, main


def parse_fail(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_mistyped_flag_prints_the_subcommands_usage_and_a_suggestion(capsys):
    err = parse_fail(capsys, "generate", "--temprature", "0", "hi")
    assert err.startswith("usage: slimlm generate"), err
    assert "--temprature" in err and "did you mean --temperature?" in err


def test_mistyped_subcommand_suggests_the_closest(capsys):
    err = parse_fail(capsys, "generat", "hi")
    assert "did you mean 'generate'?" in err


@pytest.mark.parametrize("argv, words", [
    (["generate", "--kv-cache-bytes", "1X", "hi"], ["'1X'", "512M", "2G"]),
    (["generate", "--dtype", "fp8", "hi"], ["'fp8'", "float32", "bfloat16", "fp16"]),
    (["serve", "--kv-policy", "sinc"], ["'sinc'", "did you mean 'sink'", "valid: h2o, minicache, shadowkv, sink, squeezed"]),
    (["generate", "--max-tokens", "many", "hi"], ["'many'", "integer"]),
    (["convert", "a", "b", "--dtype", "int3"], ["'int3'", "float32"]),
])
def test_bad_values_name_the_value_and_what_is_valid(capsys, argv, words):
    err = parse_fail(capsys, *argv)
    last = err.strip().splitlines()[-1]
    for w in words:
        assert w in last, (w, last)


def test_sizes_accept_units():
    a = build_parser().parse_args(["generate", "--kv-cache-bytes", "1G", "hi"])
    assert a.kv_cache_bytes == 1 << 30
    a = build_parser().parse_args(["serve", "--kv-cache-bytes", "512M"])
    assert a.kv_cache_bytes == 512 << 20


def test_version(capsys):
    from slimlm import __version__

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"slimlm {__version__}"


def _parsers(p: argparse.ArgumentParser, path: str = "slimlm"):
    yield path, p
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sp in act.choices.items():
                yield from _parsers(sp, f"{path} {name}")


def test_every_help_shows_defaults_and_renders():
    parsers = list(_parsers(build_parser()))
    assert {"slimlm generate", "slimlm chat", "slimlm serve", "slimlm bench", "slimlm eval", "slimlm train",
            "slimlm schedule plot", "slimlm convert"} <= {n for n, _ in parsers}
    for name, p in parsers:
        text = p.format_help()  # raises on a bad help string (e.g. a bare %)
        fmt = HelpFormatter(name)
        for act in p._actions:
            shown = act.option_strings and act.default not in (None, False, argparse.SUPPRESS, [])
            if shown:
                assert "(default: " in fmt._get_help_string(act), (name, act.option_strings)
        if name == "slimlm":
            assert "each subcommand maps" not in text
    g = dict(parsers)["slimlm generate"].format_help()
    for shown in ["(default: 0.8)", "(default: 40)", "(default: 0.95)", "(default: 0.05)", "fp16",
                  "vLLM's / OpenAI's defaults"]:
        assert shown in " ".join(g.split()), shown


def test_engine_flags_are_shared_by_every_engine_subcommand():
    parsers = dict(_parsers(build_parser()))
    for cmd in ["generate", "chat", "serve", "bench", "eval"]:
        flags = parsers[f"slimlm {cmd}"]._option_string_actions
        for f in ["--dtype", "--kv-cache-bytes", "--kv-policy", "--speculative", "--hook", "--no-prefix-caching",
                  "--block-size", "--threads"]:
            assert f in flags, (cmd, f)


def test_stop_escapes_are_decoded():
    from slimlm.engine.cli import sampling_params, unescape

    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"a\tb\\n") == "a\tb\\n"
    assert unescape("naïve \\r") == "naïve \r"
    a = build_parser().parse_args(["generate", "--stop", r"\n\n", "--stop", "END", "hi"])
    assert sampling_params(a).stop == ["\n\n", "END"]


def test_schedule_plot_takes_trains_override_syntax():
    for flag in ["--train.steps", "--steps"]:
        a = build_parser().parse_args(["schedule", "plot", "c.toml", flag, "30"])
        assert a.steps == 30


# ---------------------------------------------------------------------------- end to end, tiny model
def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_empty_stdin_prompt_is_refused(capsys, monkeypatch, tiny_llama_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    rc, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "-")
    assert rc == 2 and err.strip() == "error: the prompt is empty (nothing came on stdin)"


def test_max_tokens_past_the_context_is_refused_with_the_numbers(capsys, tiny_llama_dir):
    rc, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--max-tokens", "300", "hello")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "max_tokens (300)" in err and "context of 256 tokens" in err and "max_tokens <= 25" in err


def test_generate_counts_read_as_english(capsys, tiny_llama_dir):
    rc, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--max-tokens", "1", "--temperature", "0",
                     "hello")
    assert rc == 0
    assert "[1 token in" in err and "prompt 1 tokens" not in err


def test_generate_stops_at_an_escaped_stop_string(capsys, tiny_llama_dir):
    args = ["generate", "--model", str(tiny_llama_dir), "--temperature", "0", "--max-tokens", "40", "The quick"]
    rc, full, _ = run(capsys, *args)
    assert rc == 0
    text = full.rstrip("\n")
    cut = text[len(text) // 2:len(text) // 2 + 2]
    assert cut.strip(), text
    typed = cut.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    rc, out, _ = run(capsys, *args[:-1], "--stop", typed, args[-1])
    assert rc == 0 and out.rstrip("\n") == text[: text.index(cut)]


def test_convert_writes_files_readable_by_others(tmp_path, tiny_llama_dir):
    assert main(["convert", str(tiny_llama_dir), str(tmp_path / "out")]) == 0
    mask = os.umask(0)
    os.umask(mask)
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_generate_sizes_its_kv_pool_for_the_request(capsys, tiny_llama_dir):
    rc, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--max-tokens", "253", "--temperature", "0",
                     "hello")  # prompt 3 + 253 = the whole 256-token context
    assert rc == 0, err
    rc, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--max-tokens", "100",
                     "--kv-cache-bytes", "8K", "hello")
    assert rc == 2 and "set kv_cache_bytes to at least" in err and "(--kv-cache-bytes)" in err, err
