"""The weights a batch-1 decode step streams, moved onto 2 MiB pages (Linux transparent huge pages).

A decode step reads every weight once (SmolLM2-135M: 269 MB in bf16, 538 MB in fp32), far more
than any cache. On 4 KiB pages that stream crosses a page every 64 cache lines: a TLB miss and a
page walk each time (the TLB covers a few MB), and the hardware prefetchers stop at every page
boundary. PyTorch allocates tensors on 4 KiB pages (THP is "madvise" on most distributions), and a
loaded model's weights sit in the heap or in mappings of their own under 2 MiB (SmolLM2's down
projections: 1.7 MB each), where pages cannot be collapsed in place. So :func:`to_huge_pages`
copies the storages behind the given tensors into one anonymous mapping advised
``MADV_HUGEPAGE`` (2 MiB-aligned; the kernel backs it with huge pages as the copy touches it) and
re-points the given tensors and every parameter and buffer of the module on those storages (fused
q/k/v views, a tied embedding) at the copy; the old storages are freed and the freed heap returned to the OS. Values,
shapes, strides and sharing are unchanged. Measured: docs/benchmarks.md, "dense decode step".

Cost: one copy at engine start plus the new pages' faults (on this project's VM, where faults are
slow, +0.35 s for a bf16 SmolLM2-135M, +5-10 s for fp32). Best effort: where the kernel gives no huge pages (THP "never", none free, not Linux), the copy
behaves as before. Tensors held outside the module's parameters and buffers keep the old storage
alive (correct, but its memory stays). Storages already moved are left where they are (a model
served by a second engine). ``SLIMLM_HUGE_PAGES=0`` turns it off (for A/B runs).
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref

import torch
from torch import nn

ENV = "SLIMLM_HUGE_PAGES"
HUGE = 2 << 20
ALIGN = 64  # each storage starts on a cache line
MIN_BYTES = HUGE
"""Less than this in all (a tiny model) is not moved: no page would be saved."""
_arenas: list[tuple[int, int, weakref.ref]] = []  # (start, end, its mapping) of the live arenas: not moved again


def _in_arena(ptr: int) -> bool:
    _arenas[:] = [x for x in _arenas if x[2]() is not None]  # an arena goes with the last tensor on it
    return any(a <= ptr < b for a, b, _ in _arenas)


def to_huge_pages(module: nn.Module, tensors: list[torch.Tensor | None]) -> int:
    """Move the CPU storages behind ``tensors`` onto 2 MiB pages, re-pointing those tensors and every
    parameter and buffer of ``module`` that shares one of the storages; the bytes moved (0: off,
    not Linux, under ``MIN_BYTES``, or failed)."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    storages: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        if t is not None and t.device.type == "cpu" and t.numel():
            s = t.untyped_storage()
            if not _in_arena(s.data_ptr()):
                storages[s.data_ptr()] = s
    offs, total = {}, 0
    for ptr, s in storages.items():
        offs[ptr] = total
        total += -(-s.nbytes() // ALIGN) * ALIGN
    if total < MIN_BYTES or total == 0:
        return 0
    try:
        mm = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena = torch.frombuffer(mm, dtype=torch.uint8)  # holds mm (a reference) while any view lives
        skip = -arena.data_ptr() % HUGE  # the huge-page-aligned start
        mm.madvise(mmap.MADV_HUGEPAGE, skip // mmap.PAGESIZE * mmap.PAGESIZE, total + HUGE - skip)
    except (OSError, ValueError, BufferError):
        return 0
    _arenas.append((arena.data_ptr(), arena.data_ptr() + total + HUGE, weakref.ref(mm)))
    del mm  # the tensors on the arena hold it
    arena = arena[skip: skip + total]
    for ptr, s in storages.items():  # the copies, then every module tensor on an old storage re-pointed
        arena[offs[ptr]: offs[ptr] + s.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(s))
    storages.clear()  # the old storages go once nothing re-pointed below holds them
    new_storage = arena.untyped_storage()
    base = arena.data_ptr() - new_storage.data_ptr()  # the arena view's byte offset in its storage
    named = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    held = {id(t): t for t in (*(t for _, t in named), *(t for t in tensors if t is not None))}  # the given ones too: a fused
    with torch.no_grad():                                                 # projection is not a sub-module
        for t in held.values():
            ptr = t.untyped_storage().data_ptr() if t.device.type == "cpu" else None
            if ptr in offs:
                es = t.element_size()
                off = base + offs[ptr]
                assert off % es == 0
                t.data = torch.empty(0, dtype=t.dtype).set_(new_storage, off // es + t.storage_offset(), t.shape,
                                                            t.stride())
    from slimlm.model.weights import release_freed_heap

    release_freed_heap()
    return total
