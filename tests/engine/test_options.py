"""Engine flags are derived from EngineConfig: every field has one, defaults agree, values round-trip."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields

import pytest

from slimlm.engine.config import EngineConfig
from slimlm.engine.options import add_engine_args, engine_config_from_args, engine_settings, field_docs


def parser(**existing: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    for flag in existing:
        p.add_argument(flag)
    add_engine_args(p)
    return p


def test_every_field_has_a_flag_and_the_defaults_agree():
    got = engine_config_from_args(parser().parse_args([]))
    assert set(got) == {f.name for f in fields(EngineConfig)}
    assert got == asdict(EngineConfig())


def test_flags_set_every_kind_of_field():
    a = parser().parse_args([
        "--dtype", "bf16", "--block-size", "8", "--kv-cache-bytes", "2G", "--no-prefix-caching", "--kv-policy", "sink",
        "--kv-policy-arg", "window=64", "--kv-policy-arg", "sinks=4", "--hook", "ffn_skip",
        "--hook-arg", "ffn_skip.layers=[1,2]", "--no-native-kernels", "--speculative", "draft",
        "--speculative-arg", "model=some/dir", "--seed", "7", "--threads", "3",
    ])
    got = engine_config_from_args(a)
    assert got["dtype"] == "bf16" and got["block_size"] == 8 and got["kv_cache_bytes"] == 2 << 30
    assert got["enable_prefix_caching"] is False and got["native_kernels"] is False
    assert got["kv_policy_args"] == {"window": 64, "sinks": 4}
    assert got["hooks"] == ["ffn_skip"] and got["hook_args"] == {"ffn_skip": {"layers": [1, 2]}}
    assert got["speculative_args"] == {"model": "some/dir"} and got["seed"] == 7 and a.threads == 3
    EngineConfig(**got)  # what the flags give is a valid config
    dtype, engine = engine_settings(a)
    assert dtype == "bf16" and "dtype" not in engine and engine["block_size"] == 8


def test_a_subcommands_own_flag_wins():
    p = parser(**{"--seed": ""})
    a = p.parse_args(["--seed", "5"])
    assert "seed" not in engine_config_from_args(a)  # --seed is the subcommand's, not the engine's


def test_help_comes_from_the_field_docstrings():
    docs = field_docs()
    assert docs["block_size"].startswith("Tokens per KV block")
    help_text = " ".join(parser().format_help().split())
    assert "Tokens per KV block" in help_text and "one of: h2o, minicache, shadowkv, sink, squeezed" in help_text


@pytest.mark.parametrize("argv", [["--kv-policy-arg", "window"], ["--hook-arg", "ffn_skip"]])
def test_malformed_key_values_are_refused(argv):
    from slimlm.errors import SlimLMError

    with pytest.raises(SlimLMError, match="expects"):
        engine_config_from_args(parser().parse_args(argv))
