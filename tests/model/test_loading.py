"""Loading and saving: GGUF, `slimlm convert`, the named-model cache, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slimlm.cli import main
from slimlm.model import hub
from slimlm.model.gguf import write_gguf
from slimlm.model.hub import load
from tests.conftest import make_hf_model

IDS = torch.tensor([[5, 17, 99, 3, 250, 7, 7, 12, 40, 41, 42]])


def logits(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(ids)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_f32_round_trip(tmp_path, kind):
    make_hf_model(tmp_path / "hf", kind, tie_word_embeddings=kind == "qwen2")
    src = load(tmp_path / "hf")
    gguf_path = write_gguf(src.model, src.tokenizer, tmp_path / "m.gguf", "F32")
    got = load(gguf_path)
    assert torch.allclose(logits(got), logits(src), atol=1e-5)
    text = "The quick brown fox, 12345 robots.\n<|im_start|>user"
    assert got.tokenizer.encode(text) == src.tokenizer.encode(text)
    assert got.tokenizer.chat_template == src.tokenizer.chat_template
    assert got.stop_token_ids() == src.stop_token_ids()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "BF16", "F16"])
def test_gguf_quantized_loads_the_dequantized_weights(tmp_path, qtype):
    import gguf

    make_hf_model(tmp_path / "hf", "llama")
    src = load(tmp_path / "hf")
    path = write_gguf(src.model, src.tokenizer, tmp_path / "m.gguf", qtype)
    got = load(path)
    qt = gguf.GGMLQuantizationType[qtype]
    # expected: each 2-D weight quantized and de-quantized by the reference implementation
    for name, w in src.model.state_dict().items():
        if w.dim() != 2:
            continue
        ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt)
        assert np.allclose(got.model.state_dict()[name].numpy(), ref.reshape(w.shape), atol=1e-6), name
    err = (logits(got) - logits(src)).abs().max() / logits(src).abs().max()
    assert 0 < err < (0.5 if qtype.startswith("Q4") else 0.05)  # lossy, but not broken


def test_convert_round_trip_loads_in_transformers(tmp_path):
    import transformers

    make_hf_model(tmp_path / "hf", "llama")
    src = load(tmp_path / "hf")
    gguf_path = write_gguf(src.model, src.tokenizer, tmp_path / "m.gguf", "F32")
    assert main(["convert", str(gguf_path), str(tmp_path / "out")]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(ref(IDS).logits, logits(src), atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("fox jumps 123")["input_ids"] == src.tokenizer.encode("fox jumps 123")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        src.tokenizer.apply_chat_template(msgs)


def test_named_model_cache_detects_damage_and_rebuilds(tmp_path, monkeypatch):
    make_hf_model(tmp_path / "hf", "llama")
    src = load(tmp_path / "hf")
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    write_gguf(src.model, src.tokenizer, pkg / "tiny.gguf", "F32")
    m = hub.NamedModel("tiny-test", "fakepkg", "0", "tiny.gguf", "test model")
    monkeypatch.setitem(hub.KNOWN_MODELS, m.name, m)
    monkeypatch.setattr(hub, "package_file", lambda _m: pkg / "tiny.gguf")
    monkeypatch.setenv("SLIMLM_HOME", str(tmp_path / "home"))
    assert hub.cache_status(m) == "missing"
    first = load("tiny-test")
    assert hub.cache_status(m) == "ok"
    weights = hub.cache_dir(m) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\x00" * 10  # silent corruption: same size, other bytes
    weights.write_bytes(bytes(data))
    assert hub.cache_status(m) == "corrupt"
    weights.write_bytes(bytes(data[: len(data) // 2]))  # half-written
    assert hub.cache_status(m) == "corrupt"
    again = load("tiny-test")
    assert hub.cache_status(m) == "ok"
    assert torch.equal(logits(again), logits(first))


# ---------------------------------------------------------------------------- bad input
def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    rc = main(["generate", "--max-tokens", "2", *args, "hello"])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in err, (w, err)


def test_missing_path(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "--model", str(tmp_path / "nope")), "not found")


def test_dir_without_config(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "--model", str(tmp_path)), "no config.json")


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_unsupported_architecture(capsys, tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    rc, err = run_cli(capsys, "--model", str(tmp_path))
    assert_one_line_error(rc, err, model_type, "llama", "mistral", "qwen2")


def test_truncated_safetensors(capsys, tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    assert_one_line_error(*run_cli(capsys, "--model", str(tmp_path / "m")), "safetensors")


def test_truncated_gguf(capsys, tmp_path, tiny_llama_dir):
    src = load(tiny_llama_dir)
    p = write_gguf(src.model, src.tokenizer, tmp_path / "m.gguf", "F32")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert_one_line_error(*run_cli(capsys, "--model", str(p)), "GGUF")
    p.write_bytes(b"not a gguf file at all")
    assert_one_line_error(*run_cli(capsys, "--model", str(p)), "GGUF")


def test_tokenizer_vocab_mismatch(capsys, tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    make_hf_model(tmp_path / "small", "llama", vocab_size=100)
    shutil.copy(tmp_path / "m" / "tokenizer.json", tmp_path / "small" / "tokenizer.json")
    assert cfg["vocab_size"] > 100
    assert_one_line_error(*run_cli(capsys, "--model", str(tmp_path / "small")), "tokenizer", "vocab_size")


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_is_never_unpickled(capsys, tmp_path, tiny_llama_dir, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    assert_one_line_error(*run_cli(capsys, "--model", str(tmp_path / "m")), "weights_only")
    assert not Path("PWNED").exists()


def test_legacy_bin_with_plain_tensors_loads(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    (tmp_path / "m").mkdir()
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tiny_llama_dir / f, tmp_path / "m")
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), tmp_path / "m" / "pytorch_model.bin")
    assert torch.equal(logits(load(tmp_path / "m")), logits(load(tiny_llama_dir)))


def test_sharded_safetensors(tmp_path):
    import transformers

    ref = make_hf_model(tmp_path / "src", "llama")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tmp_path / "src" / f, tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.allclose(logits(load(tmp_path / "sharded")), ref(IDS).logits, atol=1e-5)
    del transformers


def _tiny_named(tmp_path, monkeypatch, where: str = "fakepkg"):
    make_hf_model(tmp_path / "hf", "llama")
    src = load(tmp_path / "hf")
    pkg = tmp_path / where
    pkg.mkdir()
    write_gguf(src.model, src.tokenizer, pkg / "tiny.gguf", "F32")
    m = hub.NamedModel("tiny-test", "fakepkg", "0", "tiny.gguf", "test model")
    monkeypatch.setitem(hub.KNOWN_MODELS, m.name, m)
    monkeypatch.setattr(hub, "package_file", lambda _m: pkg / "tiny.gguf")
    monkeypatch.setenv("SLIMLM_HOME", str(tmp_path / "home"))
    return m, pkg


def test_named_model_cache_is_keyed_by_content_not_location(tmp_path, monkeypatch, capsys):
    m, pkg = _tiny_named(tmp_path, monkeypatch)
    load("tiny-test")
    weights = hub.cache_dir(m) / "model.safetensors"
    built = weights.stat().st_mtime_ns
    other = tmp_path / "other-venv" / "site-packages" / "fakepkg"  # a second checkout / reinstall
    other.mkdir(parents=True)
    shutil.copy(pkg / "tiny.gguf", other / "tiny.gguf")
    os.utime(other / "tiny.gguf", (1, 1))
    monkeypatch.setattr(hub, "package_file", lambda _m: other / "tiny.gguf")
    capsys.readouterr()
    assert hub.cache_status(m) == "ok"
    load("tiny-test")
    assert weights.stat().st_mtime_ns == built and "rebuilding" not in capsys.readouterr().err
    monkeypatch.setattr(hub, "installed_version", lambda _m: "0.2")  # a new release of the package
    assert hub.cache_status(m) == "stale"
    monkeypatch.setattr(hub, "CONVERTER_VERSION", hub.CONVERTER_VERSION + 1)
    load("tiny-test")
    assert hub.cache_status(m) == "ok"
    manifest = json.loads((hub.cache_dir(m) / hub.MANIFEST).read_text())
    assert manifest["source"] == {"package": "fakepkg", "version": "0.2", "file": "tiny.gguf",
                                  "size": (other / "tiny.gguf").stat().st_size,
                                  "converter": hub.CONVERTER_VERSION}
    assert str(tmp_path) not in json.dumps(manifest)


def test_concurrent_cache_builders_convert_once(tmp_path, monkeypatch):
    import threading

    m, _ = _tiny_named(tmp_path, monkeypatch)
    builds = []
    real = hub._build
    monkeypatch.setattr(hub, "_build", lambda *a: (builds.append(1), real(*a)))
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(hub.ensure_cached(m))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(paths) == 3 and hub.cache_status(m) == "ok"
    assert sorted(p.name for p in hub.cache_dir(m).parent.iterdir()) == ["tiny-test", "tiny-test.lock"]


def test_cache_from_before_content_keys_is_kept_not_rebuilt(tmp_path, monkeypatch):
    m, pkg = _tiny_named(tmp_path, monkeypatch)
    load("tiny-test")
    man = hub.cache_dir(m) / hub.MANIFEST
    manifest = json.loads(man.read_text())
    src = pkg / "tiny.gguf"
    manifest["source"] = {"path": str(src), "size": src.stat().st_size, "mtime": int(src.stat().st_mtime)}
    man.write_text(json.dumps(manifest))  # as older slimlm wrote it
    assert hub.cache_status(m) == "ok"
    manifest["source"]["size"] += 1  # a different file at that path
    man.write_text(json.dumps(manifest))
    assert hub.cache_status(m) == "stale"
