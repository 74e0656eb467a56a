"""Parameter-efficient fine-tuning methods by name, and their shared config.

How to add a method: a subclass of :class:`Method` in a new file of this folder, registered with
``@METHODS.register("name")`` and imported in ``__init__.py``; ``apply`` freezes the model and
adds the trainable parts (keeping the base weights' names, so checkpoints and resume work as for
any run), ``export`` writes what a user loads afterwards. Add it to the parametrized tests in
``tests/compress/test_adapters.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM
from slimlm.registry import Registry

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    method: str = "lora"
    """'lora', 'compacter' or 'norm' (``slimlm.compress.adapters.METHODS``)."""
    rank: int = 8
    """LoRA rank r (Hu et al., 2021); Compacter's rank of each B_i factor (1 in the paper)."""
    alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / r) * B A (Hu et al., 2021, sec. 4.1)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """LoRA: the linear layers adapted, by module name (the paper adapts W_q and W_v)."""
    n: int = 4
    """Compacter: number of Kronecker products summed, W = sum_i A_i (x) B_i (Karimi Mahabadi et al., 2021)."""
    bottleneck: int = 16
    """Compacter: adapter bottleneck width k (a multiple of n)."""
    seed: int = 0
    """Seeds the adapters' random init, so a resumed run rebuilds the same starting point."""
    new_tokens: bool = False
    """Also train the embedding (and output) rows of the tokens added by `slimlm extend-vocab` to
    model.init_from (its extended_vocab.json): a new token domain (``slimlm.compress.vocab``)."""
    save: str = "merged"
    """LoRA: 'merged' (B A added into the weights: a plain HF directory), 'adapter' (PEFT's layout:
    adapter_model.safetensors + adapter_config.json, which ``peft`` loads) or 'both'."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SlimLMError(f"unknown fine-tuning method '{self.method}'; known: {', '.join(METHODS.names())}")
        if self.rank < 1 or self.n < 1 or self.bottleneck < 1:
            raise SlimLMError(f"finetune.rank, n and bottleneck must be >= 1; got {self.rank}, {self.n}, {self.bottleneck}")
        bad = [t for t in self.targets if t not in LINEARS]
        if bad or not self.targets:
            raise SlimLMError(f"finetune.targets '{bad[0] if bad else ''}' matches no module; valid: {', '.join(LINEARS)}")
        if self.save not in ("merged", "adapter", "both"):
            raise SlimLMError(f"finetune.save must be merged, adapter or both; got '{self.save}'")
        if self.new_tokens and self.method == "lora" and self.save != "merged":
            raise SlimLMError(f"finetune.new_tokens trains embedding rows that PEFT's adapter layout cannot hold; "
                              f"use finetune.save = 'merged' (got '{self.save}')")
        if self.bottleneck % self.n:
            raise SlimLMError(f"finetune.bottleneck {self.bottleneck} must be a multiple of finetune.n {self.n}")


class Method:
    """A fine-tuning method: ``apply`` before training, ``export`` after."""

    name: str

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg

    def apply(self, model: CausalLM) -> None:
        raise NotImplementedError

    def export(self, model: CausalLM, out: Path, tokenizer=None, generation_config=None) -> list[Path]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("fine-tuning method")


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
