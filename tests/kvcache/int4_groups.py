"""int4 KV with other group sizes in tests: a name "int4-k16v16" is the int4 codec with keys and
values in groups of 16 (``codec/int4.py``'s ``GROUPS`` patched for the test); other names pass."""

from __future__ import annotations

INT4_VARIANTS = ["int4-k32v32", "int4-k16v16", "int4-k32v16"]
"""The layouts other than the default (keys 16, values 32) the native kernels read."""


def use_codec(name: str, monkeypatch) -> str:
    """The registry name for ``name``, with int4's groups set as the name says."""
    if not name.startswith("int4-"):
        return name
    from slimlm.kvcache.codec import int4

    k, v = name.removeprefix("int4-k").split("v")
    monkeypatch.setattr(int4, "GROUPS", {"k": int(k), "v": int(v)})
    return "int4"
