"""The frontier's continuous-batching panel (``bench frontier --batch-panel``): the throughput
workload through the engine per configuration, interleaved with the baseline; rows with medians,
ratios to the baseline and per-repeat ratios; a configuration the engine refuses shows its reason
in its row; the report renders the panel and its figure; bad flags are one line, exit 2."""

from __future__ import annotations

import json

import pytest

from slimlm.bench.frontier import batch_rows, batch_workload
from slimlm.bench.runner import summarise_runs
from slimlm.cli import main

FAST = ["--repeats", "2", "--in-process", "--threads", "1"]


@pytest.fixture
def short_text(monkeypatch):
    """The workload's prompts from 50k characters of the stdlib instead of 3M: the same prompt
    shapes, a tokenization of a fraction of a second for the tiny tokenizer."""
    from slimlm.bench import workloads

    full = workloads.stdlib_text
    monkeypatch.setattr(workloads, "stdlib_text", lambda max_chars=50_000: full(min(max_chars, 50_000)))


def test_batch_panel_rows_ratios_and_a_refused_configuration(tiny_llama_dir, tmp_path, short_text):
    out = tmp_path / "frontier.json"
    assert main(["bench", "frontier", "--model", str(tiny_llama_dir), "--prompt-tokens", "16", "--max-tokens", "2",
                 "--quality", "none", "--batch-panel", "--num-prompts", "4", "--batch-max-tokens", "6",
                 "--config", "int8=--kv-cache-dtype int8",
                 "--config", "refused=--kv-policy minicache --kv-policy-arg start=24", *FAST, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    b = r["batch"]
    assert (b["num_prompts"], b["max_tokens"]) == (4, 6)
    assert b["workload"] == {"lo": 8, "hi": 249, "system_tokens": 66}  # scaled to the 256-token context, noted
    assert any("prompts scaled to the model's 256-token context" in n for n in r["notes"])
    rows = {row["config"]: row for row in b["rows"]}
    assert list(rows) == ["baseline", "int8", "refused"]
    for name in ("baseline", "int8"):
        runs = b["runs"][name]
        assert len(runs) == 2 and all(x["generated"] == 4 * 6 for x in runs)
        assert rows[name]["error"] is None and rows[name]["prompt_tokens"] == runs[0]["prompt_tokens"] > 0
    base, int8 = rows["baseline"], rows["int8"]
    assert base["speed_ratio"] == 1.0 and base["kv_reduction"] == 1.0
    assert int8["speed_ratio"] == pytest.approx(int8["tokens_per_s"]["median"] / base["tokens_per_s"]["median"])
    per_repeat = [i["tokens_per_s"] / bl["tokens_per_s"] for i, bl in zip(b["runs"]["int8"], b["runs"]["baseline"])]
    assert int8["speed_ratio_per_repeat"]["min"] == pytest.approx(min(per_repeat))
    assert int8["speed_ratio_per_repeat"]["n"] == 2
    assert int8["kv_reduction"] == pytest.approx(base["kv_peak_mb"] / int8["kv_peak_mb"])
    assert 3 < int8["kv_reduction"] < 4  # 8-bit codes + scales against fp32, the same prompts
    assert int8["computed_prompt_tokens"] == base["computed_prompt_tokens"]
    assert "minicache start layer 24" in rows["refused"]["error"] and rows["refused"]["tokens_per_s"] is None
    # the report renders the panel's table and figure with the frontier's
    md = tmp_path / "results.md"
    assert main(["report", str(tmp_path), "--out", str(md)]) == 0
    text = md.read_text()
    assert "Continuous batching (the `throughput` workload through the engine): 4 prompts" in text
    assert "| refused | not run: " in text and "minicache start layer 24" in text
    assert (tmp_path / "results" / "frontier-batch.png").is_file() and "results/frontier-batch.png" in text


def _run(tps, kv, prompts=100.0):
    return {"tokens_per_s": tps, "kv_peak_mb": kv, "prompt_tokens": prompts, "computed_prompt_tokens": prompts,
            "preemptions": 0.0}


def test_batch_rows_take_ratios_of_medians_and_within_each_repeat():
    runs = {"baseline": [_run(100.0, 40.0), _run(50.0, 40.0), _run(80.0, 40.0)],
            "half": [_run(60.0, 10.0), _run(20.0, 10.0), _run(20.0, 10.0)],
            "broken": [{"error": "SlimLMError: no"}] * 3}
    rows = {r["config"]: r for r in batch_rows(runs, summarise_runs(runs))}
    assert rows["half"]["speed_ratio"] == pytest.approx(20 / 80)  # medians 20 and 80
    assert rows["half"]["speed_ratio_per_repeat"]["median"] == pytest.approx(0.4)  # 0.6, 0.4, 0.25
    assert (rows["half"]["speed_ratio_per_repeat"]["min"], rows["half"]["speed_ratio_per_repeat"]["max"]) == (0.25, 0.6)
    assert rows["half"]["kv_reduction"] == 4.0 and rows["half"]["error"] is None
    assert rows["broken"]["error"] == "SlimLMError: no" and rows["broken"]["speed_ratio"] is None


def test_batch_workload_is_the_throughput_workload_when_it_fits():
    notes = []
    assert batch_workload(8192, 128, notes) == {"lo": 50, "hi": 1500, "system_tokens": 400} and notes == []
    assert batch_workload(1000, 99, notes) == {"lo": 30, "hi": 900, "system_tokens": 240} and len(notes) == 1


@pytest.mark.parametrize("argv,needle", [
    (["--num-prompts", "4"], "--num-prompts and --batch-max-tokens apply only with --batch-panel"),
    (["--batch-max-tokens", "4"], "--num-prompts and --batch-max-tokens apply only with --batch-panel"),
    (["--batch-panel", "--num-prompts", "0"], "--batch-panel needs --num-prompts >= 1 and --batch-max-tokens >= 1"),
    (["--batch-panel", "--batch-max-tokens", "200"], "--batch-max-tokens 200 leaves under 100 tokens for prompts"),
    (["--config", "y=--model"], "--config: argument --model: expected one argument"),
])
def test_batch_panel_mistakes_are_one_line_exit_2(argv, needle, tiny_llama_dir, capsys):
    assert main(["bench", "frontier", "--config", "x=--kv-cache-dtype int8", *argv, "--model", str(tiny_llama_dir),
                 "--in-process"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_quality_of_a_refused_configuration_is_a_note_not_a_failure(tiny_llama_dir, monkeypatch):
    """The engine refuses the configuration at start-up: its quality is a note; the baseline's is measured."""
    from slimlm.bench.base import BenchSettings
    from slimlm.bench.frontier import Frontier
    from slimlm.eval import cli as eval_cli

    scored = []

    def fake_evaluate(task, lm, settings, log):  # scoring itself is tested with the tasks
        scored.append(settings["engine"])
        return {"results": {"ok": 1}, "seconds": 0.0, "cpu_busy_others_max": 0.0}

    monkeypatch.setattr(eval_cli, "evaluate", fake_evaluate)
    m = str(tiny_llama_dir)
    configs = {"baseline": (m, "float32", {}),
               "refused": (m, "float32", {"kv_policy": "minicache", "kv_policy_args": {"start": 24}})}
    s = BenchSettings(model=m, dtype="float32", threads=1, engine={}, repeats=1, log=lambda msg: None)
    notes, busy = [], []
    quality = Frontier.quality(s, configs, {"perplexity": object()}, notes, busy)
    assert quality == {"baseline": {"perplexity": {"results": {"ok": 1}, "seconds": 0.0}}, "refused": {}}
    assert scored == [{}] and len(notes) == 1
    assert notes[0].startswith("refused: quality not measured: minicache start layer 24")
    with pytest.raises(ValueError, match="minicache start layer 24"):  # a refused baseline stops the run
        Frontier.quality(s, {"baseline": configs["refused"]}, {"perplexity": object()}, [], [])
