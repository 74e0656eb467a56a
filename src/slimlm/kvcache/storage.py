"""PagedKVCache: the KV tensors of the block pool, stored through the spec's codec.

Per storage (one per layer unless layers share): keys and values as the codec's tensors, each
(num_blocks, block_size, Hkv, ...). A slot is ``block * block_size + offset``. Besides writes
and block gathers, the cache moves rows between slots: block copies (copy-on-write forks),
slot moves (accepted speculative tree paths) and per-head compaction (token-level KV policies
that evict tokens and give their blocks back). With ``track_attention`` it also keeps, per
layer, the attention mass each stored key received (float32, (num_blocks, block_size, Hkv)),
moved with the keys: what score-based policies such as H2O read.
"""

from __future__ import annotations

import torch

from slimlm.kvcache.codec.base import zeros
from slimlm.kvcache.spec import KVCacheSpec


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, device, track_attention: bool = False):
        self.spec, self.codec = spec, spec.codec()
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device)
        H = spec.num_kv_heads
        self.k = [self.codec.allocate(num_blocks, block_size, H, device) for _ in range(spec.num_storages)]
        self.v = [self.codec.allocate(num_blocks, block_size, H, device) for _ in range(spec.num_storages)]
        self.mass = [zeros((num_blocks, block_size, H), torch.float32, device) for _ in spec.layers] \
            if track_attention else None
        self._ws: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ layer views
    def storage(self, layer: int) -> int:
        return self.spec.layers[layer].storage

    def pools(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        s = self.storage(layer)
        return self.k[s], self.v[s]

    def _parts(self) -> list[torch.Tensor]:
        return [t for parts in self.k + self.v for t in parts] + (self.mass or [])

    # ------------------------------------------------------------------ writes / reads
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (T, Hkv, d) into ``slots`` (T,)."""
        kp, vp = self.pools(layer)
        self.codec.write(kp, slots, k)
        self.codec.write(vp, slots, v)

    def gather(self, which: str, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks (n,) of one layer decoded to the compute dtype: (n, block_size, Hkv, d). Plain
        storage is copied into a reused workspace (no allocation per call)."""
        parts = self.pools(layer)[0 if which == "k" else 1]
        if len(parts) > 1 or parts[0].dtype != self.spec.compute_dtype:
            return self.codec.read(parts, blocks)
        pool = parts[0]
        n = blocks.numel()
        numel = n * pool[0].numel()
        ws = self._ws.get(which)
        if ws is None or ws.numel() < numel:
            ws = self._ws[which] = torch.empty(max(numel, 1 << 20), dtype=pool.dtype, device=pool.device)
        out = ws[:numel].view(n, *pool.shape[1:])
        torch.index_select(pool, 0, blocks, out=out)
        return out

    # ------------------------------------------------------------------ moves
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for t in self._parts():
            t[dst] = t[src]

    def move_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy rows between slots in every layer (src and dst may overlap: read first)."""
        if not src:
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for t in self._parts():
            flat = t.view(-1, *t.shape[2:])
            flat.index_copy_(0, d, flat.index_select(0, s))

    def compact(self, table: list[int], keep: torch.Tensor) -> None:
        """Per layer and KV head, move the stored rows ``keep`` (L, Hkv, K) (storage indices,
        ascending) to storage indices 0..K-1 of the sequence whose blocks are ``table``."""
        bs = self.block_size
        tb = torch.tensor(table, device=self.device)
        L, H, K = keep.shape
        src = tb[keep // bs] * bs + keep % bs  # (L, H, K) flat slots
        dst = tb[torch.arange(K, device=self.device) // bs] * bs + torch.arange(K, device=self.device) % bs  # (K,)
        heads = torch.arange(H, device=self.device)[:, None]  # (H, 1)
        for layer in range(L):
            s = self.storage(layer)
            if layer != next(i for i, sp in enumerate(self.spec.layers) if sp.storage == s):
                continue  # shared storage moves once, with its first layer's choice
            parts = self.k[s] + self.v[s] + ([self.mass[layer]] if self.mass is not None else [])
            for t in parts:
                flat = t.view(-1, *t.shape[2:])  # (slots, H, ...)
                rows = flat[src[layer], heads]  # (H, K, ...)
                flat[dst] = rows.transpose(0, 1)

    def clear_mass(self, blocks: list[int]) -> None:
        if self.mass is not None and blocks:
            b = torch.tensor(blocks, device=self.device)
            for m in self.mass:
                m.index_fill_(0, b, 0.0)
