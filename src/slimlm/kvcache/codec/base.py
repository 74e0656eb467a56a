"""The KV codec extension point: how one layer's keys or values are stored in the block pool.

A codec owns the storage format of one pool (keys or values of one storage group): it
allocates the tensors, encodes new rows into their slots, and decodes gathered blocks back to
the compute dtype. Every attention path reads through it: the PyTorch path decodes gathered
blocks, the native decode kernel reads the stored format in place (``native_code``).

How to add one: subclass :class:`KVCodec` in a new file of this folder, register it with
``@KV_CODECS.register("name")``, import it in ``__init__.py``; ``tests/kvcache/test_codecs.py``
runs every registered codec through the round-trip and engine tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from slimlm.registry import Registry


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed storage. On CPU it comes from calloc (via numpy), whose large allocations are
    fresh zero pages the OS commits only when written: resident memory follows the blocks in
    use, not the pool size. Masked attention needs finite values everywhere, hence zeros."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros((*shape[:-1], shape[-1] * nbytes), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)


def native_quantize(x: torch.Tensor, slots: torch.Tensor, code: int, parts: list[torch.Tensor],
                    mu: torch.Tensor | None = None, rotate: bool = False) -> bool:
    """Quantize rows x (T, H, d) float32 into ``parts`` at ``slots`` with the native kernel
    (``slimlm_kv_encode`` in kernels/paged_decode.c: x - mu (mu (H, d) float32, if given), then
    each head Hadamard-rotated by ``rotation.fwht``'s operations if ``rotate``, then quantized:
    the same bytes as the codecs' PyTorch code, one call instead of about twenty small ops a
    layer). False when it cannot run here (no kernel, another device, a rotation that is not
    Hadamard): the caller quantizes with PyTorch."""
    d = x.shape[-1]
    if rotate and d & (d - 1):
        return False
    if x.device.type != "cpu" or not all(t.device.type == "cpu" and t.is_contiguous() for t in parts):
        return False
    from slimlm import kernels

    lib = kernels.load("paged_decode")
    if lib is None:
        return False
    T, H, d = x.shape
    cap = parts[0].shape[0] * parts[0].shape[1]
    slots = slots.to(torch.int64).contiguous()
    if T and (int(slots.min()) < 0 or int(slots.max()) >= cap):
        raise ValueError(f"KV codec: slots outside the pool [0, {cap})")
    x = x.float().contiguous()
    if mu is not None:
        mu = mu.float().contiguous()
        if tuple(mu.shape) != (H, d) or mu.device.type != "cpu":
            return False
    aux2 = parts[2].data_ptr() if len(parts) > 2 else None
    return lib.slimlm_kv_encode(x.data_ptr(), mu.data_ptr() if mu is not None else None, int(rotate),
                                slots.data_ptr(), T, H, d, code, parts[0].data_ptr(), parts[1].data_ptr(), aux2) == 0


class KVCodec(ABC):
    """Storage of (num_blocks, block_size, Hkv, d) rows. ``tensors`` holds the stored parts:
    ``data`` first (the native kernels' pool), then any scales; every part is indexed by
    (block, slot, head, ...) so block copies and slot moves treat all parts alike."""

    name: ClassVar[str]
    native_code: ClassVar[int | None] = None
    """The dtype code the native kernels read in place (None: they cannot)."""

    rotates: bool = False
    """Rows are stored rotated, ``x @ R`` with R orthogonal (``codec/rotation.py``), and read back
    rotated back: PyTorch readers see the model's space. A reader of the stored rows in place
    (the native decode kernel) rotates the query by the key codec's :meth:`to_storage` before and
    the output by the value codec's :meth:`from_storage` after."""

    attend_fp32: bool = False
    """The native prefill kernel reads this codec's pools with the query, and so its arithmetic,
    in float32 whatever the model dtype. For codecs whose decoded rows (and rotated queries) are
    not bfloat16 values: in bf16 arithmetic both would be rounded to bf16 once more, an error the
    full-KV path does not have (the model's bf16 queries and keys are exact there)."""

    wants_key_offsets: bool = False
    """The engine measures a static offset per storage and KV head (``codec/offsets.py``) and
    hands it to :meth:`set_offset`; the codec subtracts it before quantizing and adds it back in
    ``read``. Exact to attention (a constant score per query); only the native readers see the
    stored, shifted keys."""

    wants_value_offsets: bool = False
    """The same for a value pool (exact: attention weights sum to 1, so a constant row shift
    comes back out of the weighted sum; ``read`` adds it back for every reader)."""

    def __init__(self, compute_dtype: torch.dtype, head_dim: int, role: str = "k"):
        """``role``: "k" or "v", the pool this instance stores (a codec may treat them apart)."""
        if role not in ("k", "v"):
            raise ValueError(f"a KV codec's role is 'k' or 'v', got {role!r}")
        self.compute_dtype, self.head_dim, self.role = compute_dtype, head_dim, role
        self._offsets: dict[int, torch.Tensor] = {}

    def set_offset(self, parts: list[torch.Tensor], mu: torch.Tensor) -> None:
        """The offset (Hkv, d) of the storage whose tensors are ``parts`` (one ``allocate`` result)."""
        self._offsets[id(parts[0])] = mu.float().to(parts[0].device)

    def offset(self, parts: list[torch.Tensor]) -> torch.Tensor | None:
        """The offset (Hkv, d) float32 of that storage, None where it has none."""
        return self._offsets.get(id(parts[0])) if self._offsets else None

    def keys_to_storage(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """Keys x (Hkv, m, d) of storage ``parts`` into the stored rows' space, float32: the offset
        subtracted, then :meth:`to_storage` (what a reader that mixes its own keys with stored
        ones in one softmax needs)."""
        mu = self.offset(parts)
        return self.to_storage(x.float() - mu[:, None] if mu is not None else x)

    def to_storage(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) into the stored rows' space, float32 (``x @ R``; x itself without rotation)."""
        if not self.rotates:
            return x
        from slimlm.kvcache.codec.rotation import fwht, rotation

        d = self.head_dim
        return fwht(x) if d & (d - 1) == 0 else x.float() @ rotation(d, x.device)

    def from_storage(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) from the stored rows' space back to the model's, float32 (``x @ R^T``)."""
        if not self.rotates:
            return x
        from slimlm.kvcache.codec.rotation import fwht, rotation

        d = self.head_dim
        return fwht(x) if d & (d - 1) == 0 else x.float() @ rotation(d, x.device).T  # Hadamard: H^T = H

    @abstractmethod
    def bytes_per_row(self, num_kv_heads: int) -> int:
        """Stored bytes of one token's row (all its KV heads), scales included."""

    @abstractmethod
    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, device) -> list[torch.Tensor]:
        """The zeroed storage tensors, ``data`` first."""

    @abstractmethod
    def write(self, tensors: list[torch.Tensor], slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store rows ``x`` (T, Hkv, d) into flat slots ``slots`` (T,) (slot = block * B + offset)."""

    @abstractmethod
    def read(self, tensors: list[torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
        """Decode whole blocks (n,) -> (n, block_size, Hkv, d) in the compute dtype."""

    @property
    def lossless(self) -> bool:
        return False


KV_CODECS: Registry[KVCodec] = Registry("KV cache dtype")
