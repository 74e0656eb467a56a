"""GGUF: read (de-quantizing with the ``gguf`` package) and write Llama-family models.

llama.cpp stores Llama q/k projections with rows permuted for its interleaved RoPE; reading
undoes that permutation (writing applies it), so the tensors match Hugging Face's layout.
The tokenizer is rebuilt from the GGUF metadata (BPE vocab, merges, special tokens, chat template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.errors import ModelLoadError, UnsupportedArchitectureError
from slimlm.model.config import ModelConfig
from slimlm.tokenizer import Tokenizer

GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre`` (the split patterns of each model family).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> llama.cpp row order for rotary q/k weights (and biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp -> HF row order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def read_gguf(path: str | Path, weights: str = "auto", group_size: int | None = None, strict: bool = False,
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None, dict]:
    """Returns (config, state dict in HF names, tokenizer, generation config). ``weights``
    "auto": every tensor de-quantized to float32; "gguf": quantized tensors kept packed
    (``slimlm.model.quant``); "int8" / "int4": de-quantized, then re-packed in that format.
    A quantized type without a packed kernel is de-quantized with a warning, or with ``strict``
    (``weights="gguf-strict"``) refused before anything is read."""
    from slimlm.model.gguf_file import GGUFFile

    path = Path(path)
    reader = GGUFFile(path)  # header only; each tensor is read when it is packed
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture '{arch}'; supported: {', '.join(sorted(set(GGUF_ARCHS.values())))}"
        )
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_layers = int(g("block_count"))
    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    hidden = int(g("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    head_dim = int(g("attention.key_length", hidden // n_head))
    rope: dict[str, Any] | None = None
    scaling_type = g("rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        rope = {"rope_type": scaling_type, "factor": float(g("rope.scaling.factor"))}
        if scaling_type == "yarn":
            rope["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length"))
    if "rope_freqs.weight" in names:
        raise UnsupportedArchitectureError(
            f"{path.name} uses per-frequency RoPE factors (rope_freqs), not supported yet; "
            "load the Hugging Face checkpoint instead"
        )
    cfg = ModelConfig(
        model_type="qwen2" if arch == "qwen2" else "llama",
        vocab_size=int(g("vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=rope,
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2",
        attention_bias=arch == "llama" and "blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    from slimlm.model.quant.load import PackOnLoad

    tokenizer = _read_tokenizer(reader, path) if tokens else None
    tokens = None
    reader.fields.clear()  # the vocabulary and merges as Python strings: a few MB, dropped now
    pack = PackOnLoad(weights, group_size)
    if strict and weights == "gguf":
        _check_packable(reader, path, pack)
    state = _read_tensors(reader, cfg, arch, path, pack)
    if pack.modules:
        cfg.extra["quantization_config"] = pack.config()
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    return cfg, state, tokenizer, gen


def _read_tensors(reader, cfg: ModelConfig, arch: str, path: Path, pack) -> dict[str, torch.Tensor]:
    from tqdm import tqdm

    from slimlm.model.quant.gguf_packed import PACKED_TYPES, pack_gguf, permute_rows
    from slimlm.model.quant.model import warn

    warned: set[str] = set()
    plain = {"F32", "F16", "BF16"}
    state: dict[str, torch.Tensor] = {}
    size = path.stat().st_size
    for t in tqdm(reader.tensors, desc=f"reading {path.name}", unit="tensor", leave=False,
                  disable=len(reader.tensors) < 50):
        if t.offset + t.n_bytes > size:
            raise ModelLoadError(f"corrupted or truncated GGUF file {path}: tensor {t.name} runs past the end")
        name = _hf_name(t.name)
        if name is None:
            raise ModelLoadError(f"{path.name}: unexpected tensor {t.name}")
        heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
        rotary = arch == "llama" and (".q_proj." in name or ".k_proj." in name)
        shape, kind = t.shape, t.type_name
        if pack.weights == "gguf" and kind not in plain and pack.wants(name, len(shape)):
            packed = pack_gguf(reader.read(t), kind, *shape) if kind in PACKED_TYPES else None
            if packed is not None:
                if rotary:
                    packed = permute_rows(packed, lambda x: _unpermute(x, heads))
                state.update(pack.add(name.rpartition(".")[0], packed))
                continue
            if kind not in warned:
                warned.add(kind)
                warn(f"GGUF type {kind} has no packed kernel; its tensors are loaded de-quantized "
                     f"(packed: {', '.join(PACKED_TYPES)})")
        if pack.wants(name, len(shape)) and pack.weights in ("int8", "int4") and len(shape) == 2:
            packed = pack_rows(reader, t, pack, name)  # row blocks: no full fp32 copy at once
            if rotary:
                packed = permute_rows(packed, lambda x: _unpermute(x, heads))
            state.update(pack.add(name.rpartition(".")[0], packed))
            continue
        w = torch.from_numpy(_dequantize(reader, t).reshape(shape))
        if rotary:
            w = _unpermute(w, heads)
        state.update(pack(name, w))
    return state


def _check_packable(reader, path: Path, pack) -> None:
    from slimlm.model.quant.gguf_packed import PACKED_TYPES

    for t in reader.tensors:
        name, kind = _hf_name(t.name), t.type_name
        if name and kind not in ("F32", "F16", "BF16") and pack.wants(name, len(t.shape)) and kind not in PACKED_TYPES:
            raise ModelLoadError(f"{path.name}: tensor {t.name} is {kind}, which has no packed kernel "
                                 f"(packed: {', '.join(PACKED_TYPES)}); use weights='gguf' to load it de-quantized")


def _dequantize(reader, t, rows: slice | None = None) -> np.ndarray:
    import gguf

    data = reader.read(t, rows)
    try:
        return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[t.type_name]), dtype=np.float32)
    except NotImplementedError:
        raise ModelLoadError(f"{reader.path.name}: tensor {t.name} has unsupported type {t.type_name}") from None


def pack_rows(reader, t, pack, name: str):
    """De-quantize and re-pack a 2-D GGUF tensor a block of rows at a time (only that block of
    the file is read and de-quantized at once)."""
    from slimlm.model.quant.model import pack_in_blocks, quantize_weight

    n, k = t.shape
    module = name.rpartition(".")[0]
    return pack_in_blocks(n, lambda i, j: quantize_weight(
        module, torch.from_numpy(_dequantize(reader, t, slice(i, j)).reshape(-1, k)), pack.weights, pack.group_size))


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _read_tokenizer(reader, path: Path) -> Tokenizer:
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{path.name}: GGUF tokenizer model '{kind}' is not supported (only BPE 'gpt2'); "
            "use the Hugging Face checkpoint directory instead"
        )
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    elif pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # gpt-2 style
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty in (3, 4)]  # control / user-defined
    tok.add_special_tokens(special)

    def name(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    return Tokenizer(
        tok,
        bos_token=name("bos_token_id"),
        eos_token=name("eos_token_id"),
        pad_token=name("padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def write_gguf(model, tokenizer: Tokenizer, path: str | Path, qtype: str = "F32") -> Path:
    """Write ``model`` as a llama.cpp GGUF; ``qtype`` applies to 2-D weights (F32, F16, BF16, Q8_0,
    Q4_0, Q4_1...), norms stay F32. Used by tests and to hand the same weights to llama.cpp."""
    import gguf

    cfg: ModelConfig = model.cfg
    if cfg.num_experts:
        raise UnsupportedArchitectureError("GGUF export of slimlm's mixture-of-experts layers is not supported; "
                                           "keep this model as a Hugging Face directory")
    if cfg.norm_placement != "pre":
        raise UnsupportedArchitectureError(f"GGUF has no {cfg.norm_placement}-LN layers (llama.cpp computes Pre-LN); "
                                           "keep this model as a Hugging Face directory")
    if cfg.parameterization != "standard":
        raise UnsupportedArchitectureError("GGUF has no μP multipliers (embedding, logit, attention scale); "
                                           "keep this model as a Hugging Face directory")
    arch = GGUF_ARCHS[cfg.model_type]
    qt = gguf.GGMLQuantizationType[qtype]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        w.add_rope_scaling_factor(float(scaling["factor"]))
        if "original_max_position_embeddings" in scaling:
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif scaling:
        raise UnsupportedArchitectureError(f"cannot write rope type {scaling.get('rope_type')} to GGUF")
    _write_tokenizer(w, tokenizer, cfg)
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    layer_inverse = {v: k for k, v in _LAYER_NAMES.items()}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name in inverse:
            gname = inverse[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{layer_inverse[module]}.{kind}"
        t = t.detach().float().cpu()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            t = _permute(t, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        arr = t.numpy()
        if arr.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_tokenizer(w, tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    tokens = [""] * max(cfg.vocab_size, max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    for i, t in enumerate(tokens):
        if not t:
            tokens[i] = f"[PAD{i}]"
    special = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    import json

    model_json = json.loads(tokenizer.tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]
    w.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        w.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(tokenizer.add_bos_token)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
