"""Model shapes to train from scratch, by name. All Llama-architecture (RMSNorm, RoPE, SwiGLU).

Parameter counts are for an 8,192-token vocabulary with tied embeddings unless the preset fixes
its vocabulary. How to add one: a ``Preset`` in ``PRESETS``; ``slimlm train --model.preset NAME``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.errors import SlimLMError
from slimlm.model import mup
from slimlm.model.config import ModelConfig
from slimlm.model.transformer import CausalLM


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    vocab_size: int | None = None
    """Fixed vocabulary (a known model's shape); None takes the data's."""
    description: str = ""


PRESETS: dict[str, Preset] = {
    "micro": Preset(64, 128, 2, 4, 2, 1024, description="tests and smoke runs (~0.6M params)"),
    "tiny-15m": Preset(384, 1280, 6, 6, 2, 2048, description="~14M params; Languini-style small runs"),
    "small-60m": Preset(512, 1536, 16, 8, 4, 2048, description="~55M params"),
    "smollm2-135m": Preset(
        576, 1536, 30, 9, 3, 8192, 100000.0, True, 49152, "SmolLM2-135M's shape (Allal et al., 2025)"
    ),
}


def model_config(name: str, vocab_size: int) -> ModelConfig:
    if name not in PRESETS:
        raise SlimLMError(f"unknown model preset '{name}'; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return ModelConfig(
        vocab_size=p.vocab_size or vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_layers=p.num_layers, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads,
        max_position_embeddings=p.max_position_embeddings, rope_theta=p.rope_theta,
        tie_word_embeddings=p.tie_word_embeddings, rms_norm_eps=1e-5,
    )


def new_model(cfg: ModelConfig, init_std: float = 0.02, seed: int = 0) -> CausalLM:
    """A freshly initialised model: matrices N(0, std), residual outputs N(0, std / sqrt(2 L))
    (GPT-2's scaled init, Radford et al., 2019), norms 1, biases 0; under μP the decoder layers'
    matrices' std is further divided by sqrt(width multiplier) (``slimlm.model.mup``)."""
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    out_std = init_std / math.sqrt(2 * cfg.num_layers)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = out_std if name.endswith(("o_proj", "down_proj")) else init_std
                m.weight.normal_(0.0, std * mup.init_scale(cfg, f"{name}.weight", m.weight.dim()))
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
