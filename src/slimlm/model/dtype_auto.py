"""``dtype="auto"``: bf16 where the hardware computes it natively, fp32 elsewhere.

bf16 halves the bytes every decode step reads and, with AVX512-BF16 dot products or AMX tiles,
runs matrix work faster than fp32; without them PyTorch emulates bf16 and fp32 is faster. GPUs
all take bf16. ``SLIMLM_AUTO_DTYPE`` (float32 / bfloat16) pins the choice (the test suite pins
float32 so its references are exact on every machine).
"""

from __future__ import annotations

import os

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of a CPU with native bf16 arithmetic."""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_dtype(device: str = "cpu", flags: set[str] | None = None) -> str:
    """"bfloat16" or "float32" for ``device`` (``flags``: the CPU's flags, read when None)."""
    pinned = os.environ.get("SLIMLM_AUTO_DTYPE")
    if pinned:
        return pinned
    if not str(device).startswith("cpu"):
        return "bfloat16"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if any(f in flags for f in NATIVE_BF16_FLAGS) else "float32"


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``dtype`` itself, or what "auto" stands for on ``device``."""
    return auto_dtype(device) if str(dtype) == "auto" else dtype
