"""dtype="auto": bf16 where the hardware has native bf16, fp32 otherwise (faked CPU flags)."""

import pytest

from slimlm.model.dtype_auto import auto_dtype, resolve_dtype


@pytest.fixture(autouse=True)
def _unpinned(monkeypatch):
    monkeypatch.delenv("SLIMLM_AUTO_DTYPE", raising=False)


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "fma"}, "float32"),
    ({"avx512f", "avx512bw"}, "float32"),  # AVX-512 without bf16 dot products: emulated bf16
    ({"avx512f", "avx512_bf16"}, "bfloat16"),  # AMD Zen 4, Intel Cooper Lake
    ({"avx512f", "amx_tile", "amx_bf16"}, "bfloat16"),  # Intel Sapphire Rapids
    (set(), "float32"),  # no /proc/cpuinfo
])
def test_cpu_choice_follows_the_flags(flags, want):
    assert auto_dtype("cpu", flags) == want


def test_gpu_takes_bf16_and_names_pass_through():
    assert auto_dtype("cuda:0", set()) == "bfloat16"
    assert resolve_dtype("float32") == "float32"


def test_the_pin_wins(monkeypatch):
    monkeypatch.setenv("SLIMLM_AUTO_DTYPE", "float32")
    assert auto_dtype("cpu", {"amx_bf16"}) == "float32"


def test_generate_prints_the_choice(capsys, tiny_llama_dir, monkeypatch):
    from slimlm.cli import main

    monkeypatch.setattr("slimlm.model.dtype_auto.cpu_flags", lambda: {"avx2"})
    assert main(["generate", "--model", str(tiny_llama_dir), "--max-tokens", "3", "--threads", "1", "Hello"]) == 0
    assert "dtype auto -> float32 (no avx512_bf16 / amx_bf16), weights dense" in capsys.readouterr().err
