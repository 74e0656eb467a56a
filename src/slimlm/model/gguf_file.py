"""A GGUF file's header and tensors, read with plain file reads (no memory map, no array per field).

``gguf.GGUFReader`` maps the whole file and keeps every metadata value as numpy views: for a
49k-token vocabulary that is ~200k small arrays, 157 MiB of resident memory while the reader lives
and ~70 MiB of fragmented heap after it is dropped (SmolLM2-135M, ``docs/results/raw/rss_phases.py``),
more than the packed model itself. Here the header becomes plain Python values (a vocabulary is one
list of str), and each tensor is read into its own buffer when asked for, so the file's pages never
count as the process's memory and a tensor's bytes are freed as soon as they are packed.

Layout (little-endian, versions 2 and 3): magic ``GGUF``, version u32, tensor count u64, metadata
count u64; each metadata entry a key (u64 length + UTF-8) with a u32 value type and its value
(arrays: u32 element type, u64 count, elements); each tensor's name, u32 dims, u64 sizes (fastest
first), u32 ggml type, u64 offset from the data section, which starts at the next multiple of
``general.alignment`` (32 by default) after the tensor table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimlm.errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
"""ggml types stored as plain arrays (read as their numpy type); any other type is read as bytes."""


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential reads from a file through a refilled buffer."""

    CHUNK = 1 << 20

    def __init__(self, f):
        self.f, self.buf, self.pos, self.base = f, b"", 0, 0

    def offset(self) -> int:
        return self.base + self.pos

    def take(self, n: int) -> tuple[bytes, int]:
        """(buffer, position) holding the next ``n`` bytes."""
        if self.pos + n > len(self.buf):
            more = self.f.read(max(n, self.CHUNK))
            self.buf, self.base, self.pos = self.buf[self.pos:] + more, self.base + self.pos, 0
            if n > len(self.buf):
                raise _Truncated
        at = self.pos
        self.pos += n
        return self.buf, at

    def unpack(self, fmt: str) -> Any:
        buf, at = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, buf, at)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        buf, at = self.take(n)
        return buf[at:at + n].decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _NUMPY:
                size = np.dtype(_NUMPY[item]).itemsize * count
                buf, at = self.take(size)
                return np.frombuffer(buf, _NUMPY[item], count, at).tolist()
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str
    """The ggml type's name (``Q4_1``, ``F32``...)."""
    shape: tuple[int, ...]
    """Row-major (slowest first), as torch and numpy index it."""
    offset: int
    """Absolute byte offset in the file."""
    n_bytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1


class GGUFFile:
    """``fields`` (metadata key -> Python value), ``tensors`` (:class:`GGUFTensor`, in file order),
    and :meth:`read` for a tensor's data. Raises :class:`ModelLoadError` on a malformed file."""

    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                cur = _Cursor(f)
                magic = cur.take(4)
                if magic[0][:4] != b"GGUF":
                    raise ValueError("no GGUF magic")
                version = cur.unpack("<I")
                if version & 0xFFFF == 0:
                    raise ValueError("a big-endian GGUF file is not supported")
                if version not in (2, 3):
                    raise ValueError(f"GGUF version {version} is not supported (2, 3)")
                n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
                self.fields: dict[str, Any] = {}
                for _ in range(n_fields):
                    key = cur.string()
                    self.fields[key] = cur.value(cur.unpack("<I"))
                infos = []
                for _ in range(n_tensors):
                    name = cur.string()
                    dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
                    infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
                align = int(self.fields.get("general.alignment", 32))
                if align <= 0 or align & (align - 1):
                    raise ValueError(f"alignment {align} is not a power of two")
                start = -(-cur.offset() // align) * align
        except _Truncated:
            raise ModelLoadError(f"corrupted or truncated GGUF file {self.path}: the header runs past the end") from None
        except (ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise ModelLoadError(f"corrupted or truncated GGUF file {self.path}: {e}") from None
        self.tensors: list[GGUFTensor] = []
        for name, dims, kind, off in infos:
            try:
                qtype = GGMLQuantizationType(kind)
                block, size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelLoadError(f"{self.path.name}: tensor {name} has unknown ggml type {kind}") from None
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if n % block:
                raise ModelLoadError(f"{self.path.name}: tensor {name} has {n} values, not whole {qtype.name} blocks")
            self.tensors.append(GGUFTensor(name, qtype.name, tuple(int(d) for d in reversed(dims)), start + off,
                                           n // block * size))

    def read(self, t: GGUFTensor, rows: slice | None = None) -> np.ndarray:
        """The tensor's data (or rows ``rows`` of its first dimension), read into a new buffer:
        a plain type as its numpy array of ``t.shape``; any other as uint8 (rows, bytes per row),
        the layout ``gguf.quants.dequantize`` and ``quant.gguf_packed.pack_gguf`` take."""
        row_bytes = t.n_bytes // t.rows
        lo, hi, _ = (rows or slice(None)).indices(t.rows)
        hi = max(hi, lo)
        buf = np.empty((hi - lo) * row_bytes, np.uint8)
        got = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset + lo * row_bytes)
            view = memoryview(buf)
            while got < buf.size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != buf.size:
            raise ModelLoadError(f"corrupted or truncated GGUF file {self.path}: tensor {t.name} runs past the end")
        if t.type_name in _PLAIN:
            return buf.view(_PLAIN[t.type_name]).reshape((hi - lo, *t.shape[1:]) if len(t.shape) > 1 else t.shape)
        return buf.reshape(hi - lo, row_bytes)
