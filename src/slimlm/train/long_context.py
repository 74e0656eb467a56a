"""Long-context continual pre-training: raise the RoPE base (ABF, "adjusted base frequency";
Xiong et al. 2023, "Effective Long-Context Scaling of Foundation Models", section 4.1) and the
stated context, then continue pre-training on long sequences (MiniCPM's long-context stage does
the same with its own base).

With a larger base theta, every frequency theta^(-2i/d) is lower, so positions past the old
context rotate the low frequencies by angles the model has seen; a short continued pre-training
on long documents then adapts the rest. Selected by ``model.rope_theta`` and
``model.context_length`` in a train config (recipe: ``recipes/long-context-abf-smollm2.toml``).
"""

from __future__ import annotations

from slimlm.errors import SlimLMError
from slimlm.model.rope import RotaryEmbedding
from slimlm.model.transformer import CausalLM


def extend_context(model: CausalLM, rope_theta: float | None, context_length: int | None) -> CausalLM:
    """The same model with RoPE base ``rope_theta`` and context ``context_length`` (either None:
    kept). Only the rotary frequencies and the config change; the weights are untouched."""
    changes = {}
    if rope_theta is not None:
        if rope_theta <= 0:
            raise SlimLMError(f"model.rope_theta must be positive, got {rope_theta}")
        changes["rope_theta"] = float(rope_theta)
    if context_length is not None:
        if context_length < 2:
            raise SlimLMError(f"model.context_length must be at least 2, got {context_length}")
        changes["max_position_embeddings"] = int(context_length)
    if not changes:
        return model
    if (model.cfg.rope_scaling or {}).get("rope_type", "default") != "default":
        raise SlimLMError("model.rope_theta / context_length: the model already scales RoPE "
                          f"({model.cfg.rope_scaling['rope_type']}); ABF starts from plain RoPE")
    model.cfg = model.cfg.replace(**changes)
    model.rotary = RotaryEmbedding(model.cfg).to(model.device)
    return model
