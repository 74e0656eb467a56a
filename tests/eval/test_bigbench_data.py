"""BIG-bench: the sdist is downloaded once and kept; new tasks come from the local archive; an
unknown or non-multiple-choice task lists the valid ones."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from slimlm.errors import SlimLMError
from slimlm.eval import data

MC = {"examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}]}
GEN = {"examples": [{"input": "say hi", "target": "hi"}]}


def fake_sdist(dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for name, task in {"arith": MC, "arith_two": MC, "greeting": GEN, "sub/part": MC}.items():
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return dest


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(data, "fetch_sdist", lambda pkg, ver, dest: (calls.append(pkg), fake_sdist(dest))[1])
    return calls


def test_sdist_is_downloaded_once_for_any_number_of_tasks(downloads):
    a = data.bigbench_task("arith")
    assert json.loads(a.read_text()) == MC and downloads == ["bigbench"]
    b = data.bigbench_task("arith_two")  # a task not extracted the first time
    c = data.bigbench_task("sub/part")
    assert b.is_file() and c.is_file() and downloads == ["bigbench"]
    assert data.bigbench_archive().is_file()


def test_unknown_or_generative_task_lists_the_multiple_choice_ones(downloads):
    with pytest.raises(SlimLMError, match=r"'arithh' does not exist \(did you mean 'arith'\?\); "
                                          r"the 3 multiple-choice tasks: arith, arith_two, sub/part"):
        data.bigbench_task("arithh")
    with pytest.raises(SlimLMError, match="'greeting' is not multiple choice"):
        data.bigbench_task("greeting")
    assert downloads == ["bigbench"]
