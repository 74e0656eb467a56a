"""Data parallelism from outside the model: DDP or FSDP2 over torch.distributed.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is single-process and
nothing here touches torch.distributed. Gradients are averaged by DDP's all-reduce or FSDP2's
reduce-scatter; the loader shards the data by rank; only rank 0 writes checkpoints and logs.
Full (unsharded) model and optimizer states for checkpoints come from
``torch.distributed.checkpoint.state_dict``, which handles plain, DDP and FSDP2 modules alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from slimlm.errors import SlimLMError
from slimlm.train.config import DistConfig


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SlimLMError("train.device is cuda but no GPU is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_world(cfg: DistConfig, device_pref: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if size > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return World(rank, size, local, device)


def wrap(model: nn.Module, world: World, strategy: str) -> nn.Module:
    if not world.distributed:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [world.local_rank] if world.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state on CPU (a collective under FSDP2: call on every rank)."""
    return get_state_dict(model, optimizer, options=FULL)


def load_full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> None:
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def load_full_model_state(model: nn.Module, model_state: dict[str, Any]) -> None:
    """Weights only (the optimizer starts fresh: its kind changed on resume)."""
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    """Tear the process group down together: a rank that exits while another still tears down
    can leave gloo's threads joinable and abort the process."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
