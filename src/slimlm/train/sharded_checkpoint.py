"""Sharded checkpoints through ``torch.distributed.checkpoint`` (``checkpoint.sharded = true``).

With FSDP2 each rank holds a shard of every parameter and of its optimizer state. The default
checkpoint gathers everything into one ``model.safetensors`` / ``optimizer.pt`` on rank 0 (memory
and time grow with the model on one process). A sharded checkpoint has every rank write its own
shards in parallel, nothing gathered:

    step-00000100/
        dcp/.metadata, dcp/__0_0.distcp, dcp/__1_0.distcp ...   model + optimizer shards (DCP)
        config.json, generation_config.json, tokenizer files       (rank 0)
        rng.pt, trainer_state.json, manifest.json                  (rank 0, manifest last)

It is written into a temporary folder and renamed into place like the full checkpoints, and
verified by the same manifest (it lists the shard files). Resume reads the shards straight into
the sharded model and optimizer; DCP reshards on load, so another process count (one process,
too) can resume it. ``consolidate`` turns one into a plain Hugging Face directory (one process)
for ``slimlm.load`` / transformers: ``slimlm runs consolidate CKPT --out DIR``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from slimlm.errors import SlimLMError
from slimlm.train import checkpoint

SHARDS = "dcp"


def save(root: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
         model_cfg, tokenizer, keep_last: int, world) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder (on every rank)."""
    import torch.distributed as dist

    step = int(trainer_state["step"])
    tmp = root / f".tmp-step-{step:08d}-sharded"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(wrapped, optimizer)  # sharded (DTensor) states: no gather
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / SHARDS))
    dist.barrier()
    final = root / f"step-{step:08d}"
    if world.main:
        (tmp / "config.json").write_text(json.dumps(model_cfg.to_hf(), indent=2))
        gen = {"bos_token_id": model_cfg.bos_token_id, "eos_token_id": model_cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        final = checkpoint.seal(root, tmp, trainer_state, keep_last)
    dist.barrier()
    return final


def load(path: Path, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read a sharded checkpoint's model (and, unless None, optimizer) state into ``wrapped``."""
    msd, osd = get_state_dict(wrapped, optimizer) if optimizer is not None else (
        get_state_dict(wrapped, [])[0], None)
    state = {"model": msd} if osd is None else {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(Path(path) / SHARDS))
    if osd is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(wrapped, state["model"])
    else:
        set_state_dict(wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def consolidate(path: str | Path, out: str | Path) -> Path:
    """A sharded checkpoint as a plain Hugging Face model directory (one process, no process group)."""
    from slimlm.model.weights import read_config, save_model_dir
    from slimlm.model.transformer import CausalLM

    path = Path(path)
    if not (path / SHARDS).is_dir():
        raise SlimLMError(f"{path} is not a sharded checkpoint (no {SHARDS}/ folder)")
    problem = checkpoint.verify(path)
    if problem is not None:
        raise SlimLMError(f"checkpoint {path} is corrupt: {problem}")
    model = CausalLM(read_config(path))
    sd = {k: v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=str(path / SHARDS))
    model.load_state_dict(sd)
    tok = None
    if (path / "tokenizer.json").is_file():
        from slimlm.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path)
    return save_model_dir(model, out, tok)
