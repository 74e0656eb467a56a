"""EngineConfig: every knob of the serving engine, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineConfig:
    dtype: str = "auto"
    """Weights, activations and KV cache dtype: "auto" is bfloat16 on a GPU or a CPU with native
    bf16 (AVX512-BF16 / AMX), float32 otherwise (slimlm.model.dtype_auto)."""
    device: str = "cpu"
    block_size: int = 16
    """Tokens per KV block. Smaller blocks share prefixes more finely; larger ones gather faster."""
    kv_cache_bytes: int | str | None = None
    """Bytes for the KV block pool, an int or a size such as "512M" or "2G"; None = 30% of available
    memory, at most 4 GiB (CPU), and never less than one full-context sequence."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (SARATHI chunk size): running decodes first, then prefill
    chunks fill what is left (Agrawal et al. 2023, decode-maximal batching). vLLM's default."""
    max_num_seqs: int = 128
    """Most sequences running at once."""
    enable_prefix_caching: bool = True
    """Share KV blocks between requests with a common prefix (hash of full blocks)."""
    batch_prefix_scheduling: bool = True
    """BatchLLM (Zheng et al. 2024): order offline batches so prompts sharing a prefix run
    together, decode-heavy ones first, and never compute a shared prefix twice at once."""
    kv_cache_dtype: str = "auto"
    """Storage format of the KV cache (see ``slimlm.kvcache.codec``): "auto" (the model's
    dtype), "float32", "bfloat16", "float16", or quantized "int8" (per-token scales) and
    "int4" (per-token groups of 32 channels)."""
    kv_policy: str | None = None
    """Name of a KV-cache policy (see ``slimlm.kvcache.policy``), e.g. "sink"."""
    kv_policy_args: dict[str, Any] = field(default_factory=dict)
    speculative: str | None = None
    """Name of a speculative proposer (see ``slimlm.engine.spec``), e.g. "draft"."""
    speculative_args: dict[str, Any] = field(default_factory=dict)
    batch_invariant: bool = True
    """Keep each row's numerics independent of what else the step holds, so greedy output is
    the same at any batch size and with or without speculative decoding, in bf16 too: a lone
    decode row runs as two identical rows (a reduced-precision matmul rounds a single row
    differently from several; the weights are still read once) and a chain of drafts is
    verified row by row through the decode attention path, as plain decode steps would attend.
    A model whose linear layers are all packed (int8 / int4 / gguf) needs no twin row: its
    decode kernels compute each row alone (up to 16 rows; more take the de-quantized matmul);
    nor does a dense model served by the native decode layers (``model/quant/native_layers.py``:
    each row alone in all-decode steps of up to 64 rows; a decode row sharing a step with a
    prefill chunk takes the PyTorch path and may round differently).
    Cost of the twin row, batch-1 bf16 decode of SmolLM2-135M: 2.8 % (docs/results/raw/ab_batch_invariant.py).
    False: the fastest path per step (bf16 near-ties may then flip between batch sizes)."""
    hooks: list[str] = field(default_factory=list)
    """Per-layer runner hooks by name (see ``slimlm.engine.hooks``)."""
    hook_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    rope_extension: str | None = None
    """Run a RoPE model past its trained context without training (``slimlm.model.rope_extension``):
    "dca" (Dual Chunk Attention, An et al. 2024 / Qwen2.5-1M), "yarn", "dynamic", or "extrapolate"
    (plain RoPE, the baseline). Raises the context check to ``context`` (default 4x trained)."""
    rope_extension_args: dict[str, Any] = field(default_factory=dict)
    sparse_prefill: str | None = None
    """Sparse attention for long prefill chunks (``slimlm.engine.sparse_prefill``): "vertical-slash"
    (MInference / Qwen2.5-1M), a per-head pattern chosen from a short probe; decode stays dense."""
    sparse_prefill_args: dict[str, Any] = field(default_factory=dict)
    blend_recompute_ratio: float = 0.15
    """CacheBlend (Yao et al. 2024): the fraction of a reused chunk's tokens recomputed (those
    whose KV deviates most at an early layer) for prompts with ``{"chunk": ...}`` segments.
    0 = plain reuse of the chunks' KV, 1 = a full prefill; the paper uses 0.15."""
    blend_select_layer: int = 1
    """CacheBlend: the layer whose KV deviation picks the recomputed tokens; layers up to it are
    computed for every token (their fresh KV is kept)."""
    blend_chunk_context: str = "prefix"
    """CacheBlend: what a chunk's cached KV is computed after. "prefix": the prompt's tokens before
    its first chunk (the instruction / system prompt; the store keys the chunk by it), so the
    chunk does not start cold as an attention sink (as Block-Attention / APE); "none": the chunk
    alone at positions 0.. (reusable after any prefix)."""
    chunk_store_bytes: int | str = "256M"
    """Memory for the CacheBlend chunk KV store (least-recently-used chunks go first)."""
    weights: str = "auto"
    """What the linear layers hold (slimlm.model.quant): "auto" (as stored: float checkpoints and
    GGUF files de-quantized into dtype), "int8" (symmetric, per output channel), "int4"
    (asymmetric, groups of weights_group_size input channels), "gguf" (a GGUF's own
    quantization, packed: Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K; a type without a packed kernel is
    de-quantized with a warning), "gguf-strict" (as "gguf", but such a type is an error)."""
    weights_group_size: int | None = None
    """Input channels per scale for weights int8 / int4 (int4 default 32; int8 default: per channel)."""
    native_kernels: bool = True
    """Use the compiled CPU kernels (``slimlm.kernels``) where they apply; False = PyTorch only."""
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.kv_cache_bytes, str):
            self.kv_cache_bytes = parse_size(self.kv_cache_bytes, "kv_cache_bytes")
        self.chunk_store_bytes = parse_size(self.chunk_store_bytes, "chunk_store_bytes")
        if self.chunk_store_bytes <= 0:
            raise ValueError(f"chunk_store_bytes must be positive, got {self.chunk_store_bytes}")
        if not 0 <= self.blend_recompute_ratio <= 1:
            raise ValueError(f"blend_recompute_ratio must be in [0, 1], got {self.blend_recompute_ratio}")
        if self.blend_chunk_context not in ("prefix", "none"):
            raise ValueError(f"blend_chunk_context must be prefix or none, got {self.blend_chunk_context!r}")
        if isinstance(self.blend_select_layer, bool) or not isinstance(self.blend_select_layer, int) \
                or self.blend_select_layer < 0:
            raise ValueError(f"blend_select_layer must be a layer index >= 0, got {self.blend_select_layer!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        from slimlm.kvcache.codec import KV_CODECS
        from slimlm.model.quant import check_weights

        check_weights(self.weights, self.weights_group_size)

        KV_CODECS.get(self.kv_cache_dtype)  # unknown names list the known ones


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, name: str = "size") -> int:
    """Bytes from ``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"4096"`` (powers of 1024; B, iB optional)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1:] if s[-1:] in SIZE_UNITS else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        raise ValueError(f"{name + ' ' if name else ''}{text!r} is not a size; use bytes or a number with K, M, "
                         "G or T (e.g. 512M, 2G)") from None
    if value <= 0:
        raise ValueError(f"{name + ' ' if name else 'a size '}must be positive, got {text!r}")
    return int(value * SIZE_UNITS[unit])


def format_size(n: int) -> str:
    """``512M``-style text that :func:`parse_size` reads back (rounded up to the unit shown)."""
    for unit in ("T", "G", "M", "K"):
        if n >= SIZE_UNITS[unit]:
            return f"{-(-n // SIZE_UNITS[unit])}{unit}"
    return str(n)


def default_kv_bytes(device: str, min_bytes: int = 0) -> int:
    """30% of free memory (50% of free GPU memory), at most 4 GiB on the CPU, but at least
    ``min_bytes`` (the engine passes one full-context sequence, so any request the model's context
    allows fits)."""
    return max(_free_share(device), min_bytes)


def _free_share(device: str) -> int:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.5)
    avail = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(min(avail * 0.3, 4 << 30))
