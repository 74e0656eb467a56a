"""Run under torchrun by test_distributed: train, then check every rank holds the same parameters."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from slimlm.train.config import load_config
from slimlm.train.trainer import Trainer


def main() -> None:
    faulthandler.dump_traceback_later(int(os.environ.get("HANG_S", "60")), exit=True)  # a hang ends with a traceback, not a stuck CI
    out = Path(sys.argv[1])
    t = Trainer(load_config(None, sys.argv[2:]))
    t.fit(int(os.environ["MAX_UPDATES"]) if os.environ.get("MAX_UPDATES") else None)  # a cut run (resume tests)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in t.wrapped.state_dict().items()}
    flat = torch.cat([v.detach().float().flatten() for v in full.values()])
    gathered = [torch.zeros_like(flat) for _ in range(t.world.size)]
    dist.all_gather(gathered, flat)
    if t.world.main:
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        (out / "ranks.json").write_text(json.dumps({"world": t.world.size, "max_rank_diff": diff}))
    t.close()


if __name__ == "__main__":
    main()
