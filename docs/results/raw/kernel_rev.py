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
