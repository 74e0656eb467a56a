"""The README's examples run as written: every shell line is either executed here (on the real
default model) or skipped for a stated reason, and the Python examples that need no server run.
A new README command fails this test until it is added to RUN or SKIP."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from slimlm.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

SKIP = {
    "make ": "sets up .venv; CI runs the suite through it",
    "path/to/": "a placeholder path",
    "slimlm chat": "interactive (tests/engine/test_stream_chat.py drives the REPL)",
    "slimlm serve": "a long-running server (tests/serve)",
    "slimlm batch": "needs a batch file (tests/test_batch.py)",
    "slimlm bench": "minutes of benchmarking (tests/bench)",
    "slimlm eval": "minutes of scoring (tests/eval)",
    "slimlm report": "needs result files (tests/bench)",
    "slimlm train": "a training run (tests/train)",
    "slimlm tokenizer": "trains on 12M characters (tests/data)",
    "slimlm data": "tokenizes a corpus (tests/data)",
    "slimlm schedule": "draws a PNG (tests/train)",
    "torchrun": "multi-process training (tests/train)",
    "slimlm.train.bench": "a training benchmark",
    "rm -rf": "deletes the model cache",
}
RUN = ("slimlm generate", "slimlm models", "slimlm convert", "slimlm quantize")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def shell_commands() -> list[str]:
    cmds = [ln.strip() for b in blocks("bash") for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]
    table = re.findall(r"^\|[^|]*\| `([^`]*(?:slimlm|make|python)[^`]*)` \|", README.read_text(), re.M)
    return cmds + table


def why_skipped(cmd: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in cmd), None)


def test_every_readme_command_is_run_or_skipped_for_a_reason():
    cmds = shell_commands()
    assert any("--stop" in c for c in cmds)
    unplanned = [c for c in cmds if not why_skipped(c) and not any(r in c for r in RUN)]
    assert not unplanned, f"add these README commands to RUN or SKIP in {__file__}: {unplanned}"
    unused = [k for k in SKIP if not any(k in c for c in cmds)]
    assert not unused, f"SKIP rules no README command needs any more: {unused}"


def runnable() -> list[str]:
    return [c for c in shell_commands() if not why_skipped(c) and any(r in c for r in RUN)]


@pytest.mark.integration
@pytest.mark.parametrize("cmd", runnable())
def test_readme_shell_example(cmd, smollm2_dir, tmp_path, monkeypatch, capfd):
    """Run in this process (the same argv through ``slimlm.cli.main``): no interpreter start-up or
    model load per command."""
    argv = shlex.split(cmd, comments=True)
    assert argv[0] == ".venv/bin/slimlm", cmd
    args = argv[1:]
    if argv[1] == "generate" and "--max-tokens" not in argv:
        args[1:1] = ["--max-tokens", "24"]  # keeps CI short; the command is otherwise as written
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    rc = main(args)
    r = capfd.readouterr()
    assert rc == 0, r.err
    if argv[1] == "generate":
        text = r.out[:-1]  # generate ends its output with one newline
        assert text.strip(), r.out
        assert "[" in r.err and "tok/s" in r.err
        if "--stop" in argv:
            stop = argv[argv.index("--stop") + 1]
            assert stop == "\\n\\n"  # typed in a shell as a backslash and an n
            assert "\n\n" not in text
    if argv[1] == "convert":
        out = tmp_path / argv[3]
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    if argv[1] == "quantize":
        cfg = (tmp_path / argv[3] / "config.json").read_text()
        assert '"quant_method": "slimlm"' in cfg and "packed modules" in r.err
    if argv[1] == "models":
        assert "smollm2-135m-instruct" in r.out and " ok " in r.out


@pytest.mark.integration
def test_readme_python_examples(smollm2_dir, capsys):
    runnable = [b for b in blocks("python") if "OpenAI(" not in b]  # the client example needs a server
    assert runnable
    for code in runnable:
        scope: dict = {}
        exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
        if "outs" in scope:
            texts = [o.outputs[0].text for o in scope["outs"]]
            assert len(texts) == 2 and all(texts)
            assert scope["chat"][0].outputs[0].text
    assert capsys.readouterr().out.strip()
