"""LoRA (Hu et al., 2021): y = W x + (alpha / r) * B A x, with W frozen, A (r, in) random, B (out, r) zero.

The adapted linear keeps the base ``weight``/``bias`` names and adds ``lora_A``/``lora_B``, so a
run's checkpoints and resume work as for any run. Export either merges B A into W (a plain HF
directory: the served model costs nothing extra) or writes PEFT's adapter layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slimlm.compress.adapters.base import METHODS, Method, freeze
from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator | None = None):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # frozen, names unchanged
        self.scale = alpha / rank
        bound = 1 / math.sqrt(base.in_features)  # nn.Linear's (and PEFT's) kaiming-uniform init of A
        a = (torch.rand(rank, base.in_features, generator=gen) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * self.lora_B @ self.lora_A)  # (out, in)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.to(self.weight.device)


def adapted(model: CausalLM, cls: type) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(parent name, parent, attribute, module) for every ``cls`` module."""
    out = []
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, cls):
                out.append((pname, parent, attr, child))
    return out


@METHODS.register("lora")
class LoRA(Method):
    def apply(self, model: CausalLM) -> None:
        freeze(model)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        hits = 0
        for _name, parent in list(model.named_modules()):
            for attr, child in list(parent.named_children()):
                if attr in self.cfg.targets and isinstance(child, nn.Linear):
                    if self.cfg.rank > min(child.in_features, child.out_features):
                        raise SlimLMError(f"finetune.rank {self.cfg.rank} is larger than {attr}'s "
                                          f"{child.out_features}x{child.in_features} matrix")
                    setattr(parent, attr, LoRALinear(child, self.cfg.rank, self.cfg.alpha, gen))
                    hits += 1
        if not hits:
            raise SlimLMError(f"finetune.targets {self.cfg.targets} match no linear layer of the model")

    def merge(self, model: CausalLM) -> None:
        for _pname, parent, attr, child in adapted(model, LoRALinear):
            setattr(parent, attr, child.merged())

    def export(self, model: CausalLM, out: Path, tokenizer=None, generation_config=None) -> list[Path]:
        from slimlm.model.weights import save_model_dir

        written = []
        if self.cfg.save in ("adapter", "both"):
            written.append(self.save_peft(model, out / "adapter"))
        if self.cfg.save in ("merged", "both"):
            self.merge(model)
            written.append(save_model_dir(model, out / "merged", tokenizer, generation_config))
        return written

    def save_peft(self, model: CausalLM, path: Path) -> Path:
        """PEFT's layout: ``base_model.model.<module>.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r)."""
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for pname, _parent, attr, child in adapted(model, LoRALinear):
            key = f"base_model.model.{pname}.{attr}"
            state[f"{key}.lora_A.weight"] = child.lora_A.detach().float().contiguous().cpu()
            state[f"{key}.lora_B.weight"] = child.lora_B.detach().float().contiguous().cpu()
        save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.cfg.rank, "lora_alpha": self.cfg.alpha,
            "target_modules": sorted(self.cfg.targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
        }, indent=2))
        return path
