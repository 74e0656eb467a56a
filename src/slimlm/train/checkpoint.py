"""Training checkpoints: a Hugging Face model directory plus the state to resume a run.

    out_dir/checkpoints/step-00000100/
        config.json, model.safetensors, generation_config.json, tokenizer files   (slimlm.load,
                                                        `slimlm generate`, transformers load these)
        optimizer.pt        optimizer state (tensors only: read back with weights_only=True)
        rng.pt              torch RNG states
        trainer_state.json  update count, tokens seen, horizon, data-loader position
        manifest.json       size and sha256 of every file above, written last

A checkpoint is written into a temporary folder and renamed into place, so it is either complete
or absent. Resume walks from the newest checkpoint down and takes the first whose manifest
verifies, saying which corrupt ones it skipped; pruning only ever deletes good checkpoints that
are older than ``keep_last`` newer good ones, so a corrupt newest one never costs the last good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm.errors import ModelLoadError, SlimLMError
from slimlm.model.config import ModelConfig
from slimlm.model.hub import sha256_file
from slimlm.model.transformer import CausalLM
from slimlm.model.weights import read_config, read_state_dict, save_model_dir

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    path: Path
    model_cfg: ModelConfig
    model_state: dict[str, torch.Tensor] | None
    """None for a sharded checkpoint (``sharded_checkpoint``): its states load onto the wrapped model."""
    optimizer: dict[str, Any] | None
    rng: dict[str, Any]
    trainer: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.model_state is None


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(
    root: Path,
    model: CausalLM,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer=None,
    keep_last: int = 3,
) -> Path:
    step = int(trainer_state["step"])
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, tmp, tokenizer)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    return seal(root, tmp, trainer_state, keep_last)


def seal(root: Path, tmp: Path, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Finish a checkpoint written into ``tmp``: RNG and trainer state, the manifest of every file
    (sub-folders too: sharded checkpoints), then the atomic rename and pruning."""
    step = int(trainer_state["step"])
    final = root / f"step-{step:08d}"
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    files = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    if final.exists():  # re-saving a step (e.g. after falling back past a corrupt one)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)  # atomic: complete or absent
    prune(root, keep_last)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name, reverse=True)


def verify(path: Path, full: bool = True) -> str | None:
    """None if the checkpoint is complete and unchanged, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['size']}"
        if full and sha256_file(f) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


def prune(root: Path, keep_last: int) -> None:
    good = [p for p in list_checkpoints(root) if verify(p, full=False) is None]
    for p in good[max(keep_last, 1) :]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):  # left by a run killed while writing
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def latest_good(root: Path, log=lambda msg: print(msg, file=sys.stderr)) -> Path | None:
    """The newest checkpoint that verifies; reports each corrupt newer one it falls back past."""
    bad: list[str] = []
    for p in list_checkpoints(root):
        problem = verify(p)
        if problem is None:
            if bad:
                log(f"slimlm: {'; '.join(bad)}; falling back to the last good checkpoint {p.name}")
            return p
        bad.append(f"checkpoint {p.name} is corrupt ({problem})")
    if bad:
        log(f"slimlm: {'; '.join(bad)}; no good checkpoint left, starting from scratch")
    return None


def with_tied_names(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every name of a tied parameter: safetensors stores a shared tensor once
    (``lm_head.weight`` with tied embeddings), and under torchrun ``set_state_dict`` wants each name."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out = dict(state)
    for names in groups.values():
        have = next((n for n in names if n in out), None)
        if have is not None:
            for n in names:
                out.setdefault(n, out[have])
    return out


def load_checkpoint(path: Path) -> Checkpoint:
    problem = verify(path)
    if problem is not None:
        raise SlimLMError(f"checkpoint {path} is corrupt: {problem}")
    try:
        cfg = read_config(path)
        sharded = (path / "dcp").is_dir()  # torch.distributed.checkpoint shards (sharded_checkpoint.py)
        state = None if sharded else read_state_dict(path)
        optimizer = None if sharded else torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        trainer = json.loads((path / "trainer_state.json").read_text())
    except (ModelLoadError, OSError, ValueError, RuntimeError) as e:
        raise SlimLMError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    return Checkpoint(path, cfg, state, optimizer, rng, trainer)


def same_shape(a: ModelConfig, b: ModelConfig) -> str | None:
    """None if two configs describe the same parameter shapes, else the first difference."""
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "tie_word_embeddings", "attention_bias", "qkv_bias", "mlp_bias"):
        if getattr(a, f) != getattr(b, f):
            return f"{f} {getattr(a, f)} vs {getattr(b, f)}"
    return None
