"""A native kernel compiled from a git revision, for same-process A/B scripts (ab_paged_prefill*.py).

``build("paged_prefill", "d80704c", tmp)`` copies the kernel's source and the files it includes
(``kernels.INCLUDES``) as they were at that revision (None: the working tree) into ``tmp``,
compiles them with the flags ``kernels.load`` uses, and returns the library with every entry's
signature set (``kernels.SIGNATURES``)."""
import ctypes, subprocess
from pathlib import Path

from slimlm import kernels

REPO = Path(__file__).resolve().parents[3]


def build(name: str, rev: str | None, tmp: Path) -> ctypes.CDLL:
    src = tmp / (rev or "tree")
    src.mkdir()
    for f in [f"{name}.c", *kernels.INCLUDES.get(name, [])]:
        path = f"src/slimlm/kernels/{f}"
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, check=True).stdout \
            if rev else (REPO / path).read_bytes()
        (src / f).write_bytes(text)
    so = src / "k.so"
    subprocess.run(["cc", *kernels._flags(), str(src / f"{name}.c"), "-o", str(so), "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    for fn, (res, args) in kernels.SIGNATURES[name].items():
        if hasattr(lib, fn):  # an older revision may lack a newer entry
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


def prefill_cases(shapes, dtype, Hq: int = 9, Hkv: int = 3, d: int = 64, bs: int = 16, seed: int = 0):
    """Random paged-prefill inputs per (T, q_start) chunk shape, for the prefill A/B scripts: per
    chunk (q (T, Hq, d) strided as the model's, k_pool, v_pool, a shuffled block table, q_start, out),
    and the causal work's FLOPs over all chunks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cases = []
    for T, q0 in shapes:
        nb = -(-(q0 + T) // bs)
        kp = torch.randn(nb + 4, bs, Hkv, d, generator=g).to(dtype)
        vp = torch.randn(nb + 4, bs, Hkv, d, generator=g).to(dtype)
        table = torch.randperm(nb + 4, generator=g)[:nb].contiguous()
        q = (2 * torch.randn(Hq, T, d, generator=g)).to(dtype).transpose(0, 1)
        cases.append((q, kp, vp, table, q0, torch.empty(T, Hq, d, dtype=dtype)))
    return cases, sum(4 * d * Hq * (T * q0 + T * (T + 1) // 2) for T, q0 in shapes)
