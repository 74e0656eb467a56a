"""Model configuration for the Llama family (Llama, Mistral, Qwen2).

One dataclass covers all three: they differ only in q/k/v bias, sliding windows and RoPE
settings. ``ModelConfig.from_hf`` reads a Hugging Face ``config.json`` (transformers 4.x
``rope_theta``/``rope_scaling`` or 5.x ``rope_parameters``); ``to_hf`` writes one back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slimlm.errors import UnsupportedArchitectureError

#: model_type -> the transformers class name written to config.json.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
NORM_PLACEMENTS = ("pre", "post", "mix")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_heads."""
    model_type: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling parameters as in config.json ({"rope_type": "yarn", "factor": 4, ...})."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v/o (Llama's ``attention_bias``)."""
    qkv_bias: bool = False
    """Bias on q/k/v only (Qwen2)."""
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    """Layers that use ``sliding_window``; empty means none."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    norm_placement: str = "pre"
    """'pre' (Llama), 'post' (original Transformer) or 'mix': Mix-LN (Li et al., 2024), Post-LN in
    the first ``int(post_ln_fraction * num_layers)`` layers and Pre-LN in the rest, so the deeper
    layers keep larger gradients and contribute more."""
    post_ln_fraction: float = 0.25
    """Mix-LN's alpha: share of the layers (the first ones) that use Post-LN (0.25 in the paper)."""
    num_experts: int = 0
    """Mixture-of-experts MLP with this many routed experts (0: dense MLP); MiniCPM-MoE uses 8."""
    num_experts_per_tok: int = 2
    """Top-k: experts each token is routed to (MiniCPM-MoE and Mixtral: 2)."""
    num_shared_experts: int = 0
    """Experts every token goes through besides the routed ones (DeepSeekMoE)."""
    moe_intermediate_size: int = 0
    """Hidden width of each expert; 0 means intermediate_size."""
    parameterization: str = "standard"
    """'standard' or 'mup' (μP, maximal update parameterization: see ``slimlm.model.mup``)."""
    mup_base_width: int = 0
    """μP: the base (proxy) model's hidden width d0; the width multiplier is hidden_size / d0."""
    mup_input_multiplier: float = 1.0
    """μP: factor on the embedding output (MiniCPM's scale_emb)."""
    mup_output_multiplier: float = 1.0
    """μP: factor on the logits at the base width (divided by the width multiplier)."""
    mup_base_head_dim: int = 0
    """μP: the base model's head width for the 1/d attention scale (0: this model's head_dim)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Unrecognised config.json keys, written back unchanged by ``to_hf``."""

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported architecture '{self.model_type}'; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {', '.join(NORM_PLACEMENTS)}; got '{self.norm_placement}'")
        if not 0.0 <= self.post_ln_fraction <= 1.0:
            raise ValueError(f"post_ln_fraction must be in [0, 1]; got {self.post_ln_fraction}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and num_experts "
                             f"{self.num_experts}")
        if self.num_experts < 0 or self.num_shared_experts < 0 or self.moe_intermediate_size < 0:
            raise ValueError("num_experts, num_shared_experts and moe_intermediate_size must be >= 0")
        from slimlm.model import mup

        mup.check(self)
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"unsupported rope type '{rope_type}'; supported: {', '.join(ROPE_TYPES)}"
            )

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        """Longest sequence the model serves: ``max_position_embeddings``, stretched by
        ``factor`` for dynamic-NTK RoPE (the other scalings already state the extended length)."""
        params = self.rope_scaling or {}
        if params.get("rope_type") == "dynamic":
            return int(self.max_position_embeddings * float(params["factor"]))
        return self.max_position_embeddings

    def post_ln(self, layer: int) -> bool:
        """Whether ``layer`` normalizes after its residual additions (Post-LN) instead of before."""
        if self.norm_placement == "mix":
            return layer < int(self.post_ln_fraction * self.num_layers)
        return self.norm_placement == "post"

    def window_for_layer(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding_layers else None

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = cfg.get("architectures") or []
            raise UnsupportedArchitectureError(
                f"unsupported architecture '{model_type or (archs[0] if archs else 'unknown')}'; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        cfg = dict(cfg)
        rope = dict(cfg.pop("rope_parameters", None) or {})
        scaling = cfg.pop("rope_scaling", None)
        if scaling:
            rope.update(scaling)
        theta = rope.pop("rope_theta", None) or cfg.pop("rope_theta", None) or 10000.0
        cfg.pop("rope_theta", None)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        rope_type = rope.get("rope_type", "default")
        if rope_type in ("llama3", "yarn"):
            rope.setdefault(
                "original_max_position_embeddings",
                cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048)),
            )
        n_layers = cfg.pop("num_hidden_layers")
        num_heads = cfg.pop("num_attention_heads")
        window = cfg.pop("sliding_window", None)
        sliding: tuple[int, ...] = ()
        layer_types = cfg.pop("layer_types", None)
        use_sw = cfg.pop("use_sliding_window", None)
        max_window_layers = cfg.pop("max_window_layers", None)
        if window:
            if layer_types:
                sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
            elif model_type == "qwen2":
                if use_sw:
                    start = max_window_layers or 0
                    sliding = tuple(range(start, n_layers))
            else:
                sliding = tuple(range(n_layers))
        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
            "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
            "model_type", "architectures", "hidden_act", "transformers_version",
            "original_max_position_embeddings", "attention_dropout", "initializer_range",
            "use_cache", "pretraining_tp", "norm_placement", "post_ln_fraction",
            "num_local_experts", "num_experts_per_tok", "num_shared_experts", "moe_intermediate_size",
            "parameterization", "mup_base_width", "mup_input_multiplier", "mup_output_multiplier", "mup_base_head_dim",
        }
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(f"unsupported activation '{act}'; supported: silu")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=n_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or 0,
            model_type=model_type,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope and rope.get("rope_type", "default") != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window if sliding else None,
            sliding_layers=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            norm_placement=cfg.get("norm_placement", "pre"),
            post_ln_fraction=float(cfg.get("post_ln_fraction", 0.25)),
            num_experts=int(cfg.get("num_local_experts", 0)),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            num_shared_experts=int(cfg.get("num_shared_experts", 0)),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0)),
            parameterization=cfg.get("parameterization", "standard"),
            mup_base_width=int(cfg.get("mup_base_width", 0)),
            mup_input_multiplier=float(cfg.get("mup_input_multiplier", 1.0)),
            mup_output_multiplier=float(cfg.get("mup_output_multiplier", 1.0)),
            mup_base_head_dim=int(cfg.get("mup_base_head_dim", 0)),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        cfg: dict[str, Any] = dict(self.extra)
        cfg.update(
            architectures=[SUPPORTED_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            torch_dtype=self.torch_dtype,
        )
        if self.norm_placement != "pre":  # slimlm-only keys: transformers ignores them (see docs/training.md)
            cfg.update(norm_placement=self.norm_placement, post_ln_fraction=self.post_ln_fraction)
        if self.num_experts:  # Mixtral's key names; slimlm's module names (see docs/training.md)
            cfg.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       num_shared_experts=self.num_shared_experts, moe_intermediate_size=self.moe_intermediate_size)
        if self.parameterization != "standard":  # slimlm-only keys: transformers ignores them (see model/mup.py)
            cfg.update(parameterization=self.parameterization, mup_base_width=self.mup_base_width,
                       mup_input_multiplier=self.mup_input_multiplier, mup_output_multiplier=self.mup_output_multiplier,
                       mup_base_head_dim=self.mup_base_head_dim)
        if self.model_type == "llama":
            cfg.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "qwen2":
            cfg.update(
                use_sliding_window=bool(self.sliding_layers),
                sliding_window=self.sliding_window,
                max_window_layers=min(self.sliding_layers) if self.sliding_layers else self.num_layers,
            )
        elif self.model_type == "mistral":
            cfg.update(sliding_window=self.sliding_window if self.sliding_layers else None)
        return cfg

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
