"""Norm-only fine-tuning ("Training BatchNorm and Only BatchNorm", Frankle et al., 2021), for RMSNorm:
every weight frozen except the norms' scales (2 per layer + the final one). The result is a
plain HF directory."""

from __future__ import annotations

from pathlib import Path

from slimlm.compress.adapters.base import METHODS, Method, freeze
from slimlm.model.transformer import CausalLM, RMSNorm


@METHODS.register("norm")
class NormOnly(Method):
    def apply(self, model: CausalLM) -> None:
        freeze(model)
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.requires_grad_(True)

    def export(self, model: CausalLM, out: Path, tokenizer=None, generation_config=None) -> list[Path]:
        from slimlm.model.weights import save_model_dir

        return [save_model_dir(model, out / "merged", tokenizer, generation_config)]
