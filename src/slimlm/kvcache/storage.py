"""PagedKVCache: the KV tensors of the block pool, stored through the spec's codec.

Per storage (one per layer unless layers share): keys and values as the codec's tensors, each
(num_blocks, block_size, Hkv, ...). A slot is ``block * block_size + offset``. Besides writes
and block gathers, the cache moves rows between slots: block copies (copy-on-write forks),
slot moves (accepted speculative tree paths) and per-head compaction (token-level KV policies
that evict tokens and give their blocks back). With ``track_attention`` it also keeps, per
layer, the attention mass each stored key received (float32, (num_blocks, block_size, Hkv)),
moved with the keys: what score-based policies such as H2O read.

Keys apart (``tier``, ShadowKV's second tier, :mod:`slimlm.kvcache.key_tier`): the key tensors
hold the tier's key blocks, fewer than the blocks; a block's keys are at its key block
(``tier.map``), or, once factored, rebuilt from the tier's record by every reader (``gather``).

Merged storages (the spec's ``merge``; MiniCache, see :mod:`slimlm.kvcache.merge`): the
storage's first layer writes its rows as they are; the second reads them back, merges each
token's pair into one direction written over the row, keeps both magnitudes, or, for a token
whose pair disagrees most, keeps it unmerged in one of the block's retention rows. Reads
rebuild each layer's rows, except that the second layer reads the rows it has just written
as they were (through the codec), not merged: a chunk attends its own keys and values exactly
at both layers of a pair, as MiniCache merges a cache after the prefill that made it (merging
them before the layer reads them would put each merged layer's error into the hidden states of
every prompt token, hence into the keys of every deeper layer). Every extra part is indexed by
block first, so block copies move it with the rows.
"""

from __future__ import annotations

import torch

from slimlm.kernels import elementwise
from slimlm.kvcache import merge as mg
from slimlm.kvcache.codec.base import zeros
from slimlm.kvcache.codec.plain import PlainCodec
from slimlm.kvcache.spec import KVCacheSpec


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, device, track_attention: bool = False,
                 tier=None):
        self.spec, self.codec, self.vcodec = spec, spec.codec("k"), spec.codec("v")  # keys', values' codec
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device)
        H = spec.num_kv_heads
        self.tier = tier
        if tier is not None and (spec.merge is not None or track_attention or spec.num_storages != len(spec.layers)):
            raise ValueError("a key tier needs one plain storage per layer (no merged layers, no attention mass)")
        nk = tier.num_key_blocks if tier is not None else num_blocks
        self.k = [self.codec.allocate(nk, block_size, H, device) for _ in range(spec.num_storages)]
        self.v = [self.vcodec.allocate(num_blocks, block_size, H, device) for _ in range(spec.num_storages)]
        self.mass = [zeros((num_blocks, block_size, H), torch.float32, device) for _ in spec.layers] \
            if track_attention else None
        self._ws: dict[str, torch.Tensor] = {}
        # merged storages: state per slot, retention rows, per-layer magnitudes of k and v
        self.state: dict[int, torch.Tensor] = {}
        self.rk: dict[int, list[torch.Tensor]] = {}
        self.rv: dict[int, list[torch.Tensor]] = {}
        self.mag: dict[int, torch.Tensor] = {}  # layer -> (num_blocks, block_size, 2, H): k, v
        for st in spec.merged_storages:
            self.state[st] = zeros((num_blocks, block_size), torch.int8, device)
            self.rk[st] = self.codec.allocate(num_blocks, spec.merge.rows, H, device)
            self.rv[st] = self.vcodec.allocate(num_blocks, spec.merge.rows, H, device)
        for i, ls in enumerate(spec.layers):
            if ls.storage in self.state:
                self.mag[i] = zeros((num_blocks, block_size, 2, H), mg.MAGNITUDE_DTYPE, device)
        self._plain = tier is None and all(type(c).write is PlainCodec.write and c.storage_dtype == spec.compute_dtype
                                           for c in (self.codec, self.vcodec))
        """Keys and values stored as computed, one tensor each, no key tier: writes may take the native
        row copy (``kernels/elementwise.py``'s ``kv_write``; ``index_copy_`` where it does not apply)."""
        self._own: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """Second layer of a merged storage -> (slots, k, v) of its latest write, as the codec
        gives them back: what that layer reads at those slots until its next write."""

    @property
    def lossless(self) -> bool:
        """Reading a slot back gives exactly what was written (the prefill may use new keys)."""
        return self.codec.lossless and self.vcodec.lossless and not self.state

    def key_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat slots -> their slots in the key tensors (the same without a key tier)."""
        if self.tier is None:
            return slots
        bs = self.block_size
        ks = self.tier.map.to(slots.device)[slots // bs] * bs + slots % bs
        if ks.numel() and int(ks.min()) < 0:
            raise RuntimeError("a write or move into a block whose keys were factored (it is read-only)")
        return ks

    # ------------------------------------------------------------------ layer views
    def storage(self, layer: int) -> int:
        return self.spec.layers[layer].storage

    def pools(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        s = self.storage(layer)
        return self.k[s], self.v[s]

    def _parts(self, keys: bool = True) -> list[torch.Tensor]:
        merged = [*self.state.values(), *self.mag.values()] + [t for d in (self.rk, self.rv) for p in d.values() for t in p]
        return [t for parts in (self.k if keys else []) + self.v for t in parts] + (self.mass or []) + merged

    def merged(self, layer: int) -> bool:
        return self.storage(layer) in self.state

    # ------------------------------------------------------------------ writes / reads
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (T, Hkv, d) into ``slots`` (T,)."""
        kp, vp = self.pools(layer)
        if self.merged(layer) and self.spec.layers[layer].member == 1:
            self._merge_write(layer, slots, k, v)
            return
        if not (self._plain and elementwise.kv_write(k, v, slots, kp[0], vp[0])):
            self.codec.write(kp, self.key_slots(slots), k)
            self.vcodec.write(vp, slots, v)
        if self.merged(layer):  # the slots hold this layer's raw rows; later slots of the block are stale
            st = self.state[self.storage(layer)]
            bs = self.block_size
            first = torch.full((self.num_blocks,), bs, dtype=torch.long, device=self.device)
            first.scatter_reduce_(0, slots // bs, slots % bs, "amin")
            st.masked_fill_(torch.arange(bs, device=self.device)[None, :] >= first[:, None], mg.RAW)

    def _read_slots(self, parts: list[torch.Tensor], slots: torch.Tensor, codec) -> torch.Tensor:
        """Decoded rows (T, H, d) at flat ``slots``."""
        bs = self.block_size
        ub, inv = torch.unique(slots // bs, return_inverse=True)
        return codec.read(parts, ub)[inv, slots % bs]

    def _roundtrip(self, codec, parts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Rows x (T, H, d) as storage ``parts`` would give them back (its codec and key offset)."""
        if codec.lossless:
            return x
        T, H = x.shape[:2]
        tmp = codec.allocate(1, T, H, self.device)
        mu = codec.offset(parts)
        if mu is not None:
            codec.set_offset(tmp, mu)
        codec.write(tmp, torch.arange(T, device=self.device), x)
        out = codec.read(tmp, torch.zeros(1, dtype=torch.long, device=self.device))[0]
        codec._offsets.pop(id(tmp[0]), None)
        return out

    def _merge_write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The second layer of a merged storage: merge with the first layer's rows at ``slots``."""
        s, spec, bs = self.storage(layer), self.spec.merge, self.block_size
        self._own[layer] = (slots, self._roundtrip(self.codec, self.k[s], k), self._roundtrip(self.vcodec, self.v[s], v))
        first = next(i for i, ls in enumerate(self.spec.layers) if ls.storage == s and ls.member == 0)
        kp, vp = self.k[s], self.v[s]
        ek, nk0, nk1, dk = mg.slerp(self._read_slots(kp, slots, self.codec), k, spec.t)  # (T, H, d), (T, H) x3
        ev, nv0, nv1, dv = mg.slerp(self._read_slots(vp, slots, self.vcodec), v, spec.t)
        st = self.state[s]
        blocks = slots // bs
        used = (st.index_select(0, blocks) >= 2).sum(-1)  # rows taken before these (later slots are raw)
        row = mg.retain(mg.distance(dk, dv), blocks, used, spec.threshold, spec.rows)  # (T,)
        keep, mrg = row >= 0, row < 0
        if bool(keep.any()):
            rslots = blocks[keep] * spec.rows + row[keep]
            self.codec.write(self.rk[s], rslots, k[keep])
            self.vcodec.write(self.rv[s], rslots, v[keep])
        if bool(mrg.any()):
            ms = slots[mrg]
            self.codec.write(kp, ms, ek[mrg].to(k.dtype))
            self.vcodec.write(vp, ms, ev[mrg].to(v.dtype))
            H = k.shape[1]
            self.mag[first].view(-1, 2, H).index_copy_(0, ms, torch.stack([nk0, nv0], 1)[mrg].to(mg.MAGNITUDE_DTYPE))
            self.mag[layer].view(-1, 2, H).index_copy_(0, ms, torch.stack([nk1, nv1], 1)[mrg].to(mg.MAGNITUDE_DTYPE))
        st.view(-1).index_copy_(0, slots, torch.where(keep, row + 2, mg.MERGED).to(torch.int8))

    def gather(self, which: str, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks (n,) of one layer decoded to the compute dtype: (n, block_size, Hkv, d). Plain
        storage is copied into a reused workspace (no allocation per call)."""
        parts = self.pools(layer)[0 if which == "k" else 1]
        if self.merged(layer):
            return self._merged_read(which, layer, parts, blocks)
        if which == "k" and self.tier is not None:
            return self._tier_read(layer, parts, blocks)
        if len(parts) > 1 or parts[0].dtype != self.spec.compute_dtype:
            return (self.codec if which == "k" else self.vcodec).read(parts, blocks)
        pool = parts[0]
        n = blocks.numel()
        numel = n * pool[0].numel()
        ws = self._ws.get(which)
        if ws is None or ws.numel() < numel:
            ws = self._ws[which] = torch.empty(max(numel, 1 << 20), dtype=pool.dtype, device=pool.device)
        out = ws[:numel].view(n, *pool.shape[1:])
        torch.index_select(pool, 0, blocks, out=out)
        return out

    def _tier_read(self, layer: int, parts: list[torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
        """Keys of ``blocks`` with a key tier: read at their key blocks, or rebuilt when factored."""
        kb = self.tier.map.to(blocks.device)[blocks]
        out = self.codec.read(parts, kb.clamp(min=0))  # (n, B, H, d)
        for i in (kb < 0).nonzero()[:, 0].tolist():
            out[i] = self.tier.rebuild(layer, int(blocks[i]), self.block_size).to(out.dtype)
        return out

    def _merged_read(self, which: str, layer: int, parts: list[torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
        """Rows of one layer of a merged storage: magnitude x shared direction, or the token's own
        unmerged state (the row for the first layer, its retention row for the second)."""
        s = self.storage(layer)
        codec = self.codec if which == "k" else self.vcodec
        out = codec.read(parts, blocks)  # (n, B, H, d), a new tensor
        st = self.state[s].index_select(0, blocks)  # (n, B)
        mag = self.mag[layer].index_select(0, blocks)[:, :, 0 if which == "k" else 1].to(out.dtype)  # (n, B, H)
        # one pass over the rows: merged ones times their magnitude, the others times 1 (exact)
        out.mul_(torch.where((st == mg.MERGED)[..., None], mag, torch.ones((), dtype=out.dtype))[..., None])
        if self.spec.layers[layer].member == 1 and self.spec.merge.rows:
            i, j = (st >= 2).nonzero(as_tuple=True)  # the few retained tokens: their own rows
            if i.numel():
                ret = codec.read((self.rk if which == "k" else self.rv)[s], blocks)  # (n, R, H, d)
                out[i, j] = ret[i, st[i, j].long() - 2]
        if layer in self._own:  # the rows this layer has just written: as written, not merged
            slots, k, v = self._own[layer]
            i, j = (blocks[:, None] == (slots // self.block_size)[None, :]).nonzero(as_tuple=True)
            out[i, slots[j] % self.block_size] = (k if which == "k" else v)[j].to(out.dtype)  # out is a new tensor
        return out

    # ------------------------------------------------------------------ moves
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        if self.tier is not None:  # keys: between key blocks; a factored source is rebuilt
            ks, kd = self.tier.map.to(self.device)[src], self.tier.map.to(self.device)[dst]
            held = ks >= 0
            for t in (t for parts in self.k for t in parts):
                t[kd[held]] = t[ks[held]]
            if not bool(held.all()):
                gone = ~held
                slots = (kd[gone][:, None] * self.block_size + torch.arange(self.block_size, device=self.device)).flatten()
                for layer in range(len(self.spec.layers)):
                    keys = self.gather("k", layer, src[gone])  # (n, bs, H, d)
                    self.codec.write(self.k[self.storage(layer)], slots, keys.flatten(0, 1))
        for t in self._parts(keys=self.tier is None):
            t[dst] = t[src]

    def move_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy rows between slots in every layer (src and dst may overlap: read first)."""
        if not src:
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for t in self._parts(keys=self.tier is None):
            flat = t.view(-1, *t.shape[2:])
            flat.index_copy_(0, d, flat.index_select(0, s))
        if self.tier is not None:
            ks, kd = self.key_slots(s), self.key_slots(d)
            for t in (t for parts in self.k for t in parts):
                flat = t.view(-1, *t.shape[2:])
                flat.index_copy_(0, kd, flat.index_select(0, ks))

    def compact(self, table: list[int], keep: torch.Tensor) -> None:
        """Per layer and KV head, move the stored rows ``keep`` (L, Hkv, K) (storage indices,
        ascending) to storage indices 0..K-1 of the sequence whose blocks are ``table``."""
        bs = self.block_size
        if self.tier is not None:
            raise RuntimeError("compaction moves keys per head; a key tier holds factored blocks read-only")
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
