"""KVCacheSpec: what the KV cache stores for each layer, decided once at engine start-up.

Per layer: the storage group it writes to (layers of one group share one storage: the seam
cross-layer methods such as MiniCache use), its codec (``kv_cache_dtype``), and its sliding
window. vLLM v1's ``KVCacheSpec`` is the model: a frozen description the cache, the backends
and the memory accounting all read, instead of branches spread through the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.kvcache.codec import KV_CODECS, KVCodec
from slimlm.model.config import ModelConfig


@dataclass(frozen=True)
class LayerKVSpec:
    storage: int
    """Index of the storage this layer reads and writes (layers may share one)."""
    window: int | None
    """Sliding window of the layer (keys older than this are masked), or None."""


@dataclass(frozen=True)
class KVCacheSpec:
    layers: tuple[LayerKVSpec, ...]
    codec_name: str
    num_kv_heads: int
    head_dim: int
    compute_dtype: torch.dtype

    @classmethod
    def from_model(cls, cfg: ModelConfig, compute_dtype: torch.dtype, kv_cache_dtype: str = "auto",
                   shared: dict[int, int] | None = None) -> KVCacheSpec:
        """``shared`` maps a layer to the layer whose storage it uses (cross-layer sharing)."""
        KV_CODECS.get(kv_cache_dtype)  # unknown names list the known ones
        shared = shared or {}
        owners = sorted({shared.get(i, i) for i in range(cfg.num_layers)})
        index = {layer: k for k, layer in enumerate(owners)}
        layers = tuple(LayerKVSpec(index[shared.get(i, i)], cfg.window_for_layer(i)) for i in range(cfg.num_layers))
        return cls(layers, kv_cache_dtype, cfg.num_kv_heads, cfg.head_dim, compute_dtype)

    @property
    def num_storages(self) -> int:
        return 1 + max(s.storage for s in self.layers)

    def codec(self) -> KVCodec:
        return KV_CODECS.get(self.codec_name)(self.compute_dtype, self.head_dim)

    def bytes_per_token(self) -> int:
        """KV bytes one token holds across all storages (keys and values, scales included)."""
        return 2 * self.num_storages * self.codec().bytes_per_row(self.num_kv_heads)

    def bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_token() * block_size

    @property
    def has_windows(self) -> bool:
        return any(s.window is not None for s in self.layers)
