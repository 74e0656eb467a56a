"""Build the pieces a run needs from its config: data, model (+ tokenizer), batch sources."""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.data.loader import BatchSource, PackedLoader
from slimlm.data.prepare import tokenizer_sha256
from slimlm.data.tokens import TokenDataset
from slimlm.data.varlen import VariableLengthSampler
from slimlm.errors import SlimLMError
from slimlm.model.config import ModelConfig
from slimlm.model.transformer import CausalLM
from slimlm.tokenizer import Tokenizer
from slimlm.train.config import TrainConfig
from slimlm.train.distributed import World
from slimlm.train.presets import model_config, new_model


def train_datasets(cfg: TrainConfig) -> list[TokenDataset]:
    if not cfg.data.train:
        raise SlimLMError("no training data: set data.train to folders made by `slimlm data prepare`")
    sets = [TokenDataset(p, "train") for p in cfg.data.train]
    for ds in sets:
        if ds.n_tokens == 0:
            raise SlimLMError(f"{ds.path} has no training tokens")
        if ds.meta.tokenizer_sha256 != sets[0].meta.tokenizer_sha256:
            raise SlimLMError(f"{ds.path} and {sets[0].path} were prepared with different tokenizers")
    return sets


def build_model(cfg: TrainConfig, data: TokenDataset) -> tuple[CausalLM, Tokenizer | None]:
    meta = data.meta
    if cfg.model.growth.source and cfg.model.init_from:
        raise SlimLMError("model.init_from and model.growth.source are exclusive: growth starts from its source")
    if cfg.model.growth.source:
        from slimlm.model.hub import load
        from slimlm.train.growth import grow

        g = cfg.model.growth
        lm = load(g.source)
        model, tok = grow(lm.model.float(), g.operator, g.factor), lm.tokenizer
        if tok is not None and tokenizer_sha256(tok) != meta.tokenizer_sha256:
            raise SlimLMError(f"{data.path} was tokenized with another tokenizer than {g.source}")
    elif cfg.model.init_from:
        from slimlm.model.hub import load

        if cfg.model.parameterization != "standard":
            raise SlimLMError("model.parameterization shapes new models; a model continued with model.init_from "
                              "keeps its own")
        lm = load(cfg.model.init_from)
        model, tok = lm.model, lm.tokenizer
        if (cfg.model.norm_placement, cfg.model.post_ln_fraction) != ("pre", 0.25) and (
                cfg.model.norm_placement, cfg.model.post_ln_fraction) != (model.cfg.norm_placement, model.cfg.post_ln_fraction):
            raise SlimLMError(f"model.norm_placement / post_ln_fraction shape new models; {cfg.model.init_from} keeps "
                              f"its own ({model.cfg.norm_placement}, {model.cfg.post_ln_fraction})")
        if tok is not None and tokenizer_sha256(tok) != meta.tokenizer_sha256:
            raise SlimLMError(
                f"{data.path} was tokenized with another tokenizer than {cfg.model.init_from}; "
                f"prepare it with --tokenizer {cfg.model.init_from}"
            )
    else:
        vocab = cfg.model.vocab_size or -(-meta.vocab_size // 64) * 64
        mcfg = model_config(cfg.model.preset, vocab).replace(
            norm_placement=cfg.model.norm_placement, post_ln_fraction=cfg.model.post_ln_fraction)
        if cfg.model.num_layers:
            mcfg = mcfg.replace(num_layers=cfg.model.num_layers)
        mcfg = shaped(mcfg, cfg.model)
        moe = cfg.model.moe
        if moe.num_experts:
            mcfg = mcfg.replace(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                                num_shared_experts=moe.shared_experts, moe_intermediate_size=moe.intermediate_size)
        mcfg.eos_token_id = meta.eos_id
        model = new_model(mcfg, cfg.model.init_std, cfg.train.seed)
        tok_dir = Path(data.path) / "tokenizer"
        tok = Tokenizer.from_dir(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
    if cfg.model.rope_theta is not None or cfg.model.context_length is not None:
        from slimlm.train.long_context import extend_context

        model = extend_context(model, cfg.model.rope_theta, cfg.model.context_length)
    if model.cfg.vocab_size < meta.vocab_size:
        raise SlimLMError(f"model vocab_size {model.cfg.vocab_size} is smaller than the data's vocab {meta.vocab_size}")
    if cfg.data.seq_len > model.cfg.context_length:
        raise SlimLMError(
            f"data.seq_len {cfg.data.seq_len} is beyond the model's context ({model.cfg.context_length} tokens)"
        )
    return model.float().train(), tok


def shaped(mcfg: ModelConfig, spec) -> ModelConfig:
    """The preset's config with the spec's width overrides and parameterization (one-line errors)."""
    widths = {k: getattr(spec, k) for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads")
              if getattr(spec, k) is not None}
    if spec.parameterization == "mup":
        m = spec.mup
        widths.update(parameterization="mup", mup_base_width=m.base_width, mup_input_multiplier=m.input_multiplier,
                      mup_output_multiplier=m.output_multiplier, mup_base_head_dim=m.base_head_dim)
    if not widths:
        return mcfg
    if "hidden_size" in widths or "num_heads" in widths:
        widths["head_dim"] = 0  # recomputed from hidden_size / num_heads
    hidden, heads = widths.get("hidden_size", mcfg.hidden_size), widths.get("num_heads", mcfg.num_heads)
    if hidden % heads:
        raise SlimLMError(f"model.hidden_size {hidden} is not a multiple of model.num_heads {heads}")
    if (hidden // heads) % 2:
        raise SlimLMError(f"model.hidden_size {hidden} / model.num_heads {heads} gives an odd head width "
                          f"{hidden // heads}; RoPE needs an even one")
    try:
        return mcfg.replace(**widths)
    except ValueError as e:
        raise SlimLMError(f"model: {e}") from None


def batch_source(cfg: TrainConfig, sets: list[TokenDataset], world: World) -> BatchSource:
    d = cfg.data
    if d.packing == "varlen":
        if len(sets) > 1:
            raise SlimLMError("data.packing 'varlen' takes one train folder")
        return VariableLengthSampler(sets[0], d.micro_batch * d.seq_len * world.size, d.seq_len, d.min_len,
                                     world.rank, world.size, d.seed, d.curriculum, d.curriculum_cycles)
    return PackedLoader(sets, d.seq_len, d.micro_batch, d.weights or None, d.packing, world.rank, world.size, d.seed)


def val_loaders(cfg: TrainConfig, world: World, warn) -> dict[str, PackedLoader]:
    out = {}
    packing = "concat" if cfg.data.packing == "concat" else "document"
    for p in cfg.data.val or cfg.data.train:
        try:
            ds = TokenDataset(p, "val")
            out[Path(p).name] = PackedLoader([ds], cfg.data.seq_len, cfg.data.micro_batch, None, packing,
                                             world.rank, world.size, cfg.data.seed, shuffle=False)
        except SlimLMError as e:
            warn(f"slimlm: no held-out evaluation for {p}: {e}")
    return out


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
