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
from slimlm.kvcache.merge import MAGNITUDE_DTYPE, MergeSpec
from slimlm.model.config import ModelConfig


@dataclass(frozen=True)
class LayerKVSpec:
    storage: int
    """Index of the storage this layer reads and writes (layers may share one)."""
    window: int | None
    """Sliding window of the layer (keys older than this are masked), or None."""
    member: int = 0
    """Position of the layer among those sharing its storage (0: the first, which owns it)."""


@dataclass(frozen=True)
class KVCacheSpec:
    layers: tuple[LayerKVSpec, ...]
    codec_name: str
    num_kv_heads: int
    head_dim: int
    compute_dtype: torch.dtype
    merge: MergeSpec | None = None
    """Layers sharing a storage merge their states (MiniCache: shared directions, per-layer
    magnitudes, retention rows); None: a shared storage is simply shared."""

    @classmethod
    def from_model(cls, cfg: ModelConfig, compute_dtype: torch.dtype, kv_cache_dtype: str = "auto",
                   shared: dict[int, int] | None = None, merge: MergeSpec | None = None) -> KVCacheSpec:
        """``shared`` maps a layer to the layer whose storage it uses (cross-layer sharing)."""
        KV_CODECS.get(kv_cache_dtype)  # unknown names list the known ones
        shared = shared or {}
        owners = sorted({shared.get(i, i) for i in range(cfg.num_layers)})
        index = {layer: k for k, layer in enumerate(owners)}
        seen: dict[int, int] = {}
        layers = []
        for i in range(cfg.num_layers):
            s = index[shared.get(i, i)]
            layers.append(LayerKVSpec(s, cfg.window_for_layer(i), seen.get(s, 0)))
            seen[s] = seen.get(s, 0) + 1
        if merge is not None and max(seen.values()) > 2:
            raise ValueError("merged storages hold two layers each")
        return cls(tuple(layers), kv_cache_dtype, cfg.num_kv_heads, cfg.head_dim, compute_dtype, merge)

    @property
    def num_storages(self) -> int:
        return 1 + max(s.storage for s in self.layers)

    def codec(self, role: str = "k") -> KVCodec:
        return KV_CODECS.get(self.codec_name)(self.compute_dtype, self.head_dim, role)

    def bytes_per_token(self) -> int:
        """KV bytes one token holds across all storages (keys and values, scales included;
        without the retention rows of merged storages, which are per block)."""
        return self.num_storages * self.bytes_per_kv_row()

    def bytes_per_kv_row(self) -> int:
        """One token's key row plus its value row in one storage (the codecs may store them apart:
        int4 keeps keys in smaller groups than values)."""
        return self.codec("k").bytes_per_row(self.num_kv_heads) + self.codec("v").bytes_per_row(self.num_kv_heads)

    @property
    def merged_storages(self) -> list[int]:
        """Storages whose layers merge (those shared by two layers, with a merge spec)."""
        if self.merge is None:
            return []
        return sorted({s.storage for s in self.layers if s.member == 1})

    def bytes_per_block(self, block_size: int) -> int:
        """Everything one block holds: rows, and for merged storages per-layer magnitudes of keys
        and values (fp16 per token and head), a state byte per token and the retention rows."""
        total = self.bytes_per_token() * block_size
        m = len(self.merged_storages)
        if m:
            mag = torch.empty((), dtype=MAGNITUDE_DTYPE).element_size()
            per_storage = block_size * (2 * 2 * self.num_kv_heads * mag + 1) \
                + self.merge.rows * self.bytes_per_kv_row()
            total += m * per_storage
        return total

    @property
    def has_windows(self) -> bool:
        return any(s.window is not None for s in self.layers)
