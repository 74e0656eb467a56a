"""`slimlm train CONFIG --print-config` prints the effective config as TOML that reads back."""

from __future__ import annotations

import tomllib

from slimlm.cli import main
from slimlm.train.config import load_config
from slimlm.train.config_toml import to_toml

RECIPE = "recipes/tiny15m-stdlib-wsd.toml"


def test_print_config_shows_overrides_and_reads_back(capsys, tmp_path):
    capsys.readouterr()
    assert main(["train", RECIPE, "--train.steps", "30", "--optim.weight_decay", "0.05", "--print-config"]) == 0
    text = capsys.readouterr().out
    raw = tomllib.loads(text)
    assert raw["train"]["steps"] == 30 and raw["optim"]["weight_decay"] == 0.05
    (tmp_path / "eff.toml").write_text(text)
    want = load_config(RECIPE, ["--train.steps", "30", "--optim.weight_decay", "0.05"])
    assert load_config(tmp_path / "eff.toml") == want
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_to_toml_values():
    text = to_toml({"a": None, "b": True, "c": 1e-8, "d": [1, 2], "e": 'say "hi"\n', "s": {"x": 1, "t": {"y": "z"}}})
    assert tomllib.loads(text) == {"a": "none", "b": True, "c": 1e-8, "d": [1, 2], "e": 'say "hi"\n',
                                   "s": {"x": 1, "t": {"y": "z"}}}


def test_train_help_lists_the_config_keys():
    from slimlm.cli import build_parser

    parsers = build_parser()._subparsers._group_actions[0].choices  # argparse keeps no public map
    text = parsers["train"].format_help()
    for shown in ["--print-config", "[train] steps,", "warmup_steps", "[optim] name,", "wsd"]:
        assert shown in text, shown
