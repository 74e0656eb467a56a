"""Benchmark scenarios on tiny models: every scenario runs and records what it promises, packing
is exact, a KV policy shows as memory saved, the frontier catches a broken configuration, and
mistakes (unknown scenario, missing baseline, corrupt results) are one line or a note."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimlm.cli import build_parser, main

FAST = ["--repeats", "1", "--in-process", "--threads", "1"]


def bench(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert main(["bench", *args, *FAST, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results(tiny_llama_dir, tmp_path_factory):
    """decode, prefill, packing and memory on the tiny model, slimlm and transformers."""
    d = tmp_path_factory.mktemp("results")
    m = ["--model", str(tiny_llama_dir)]
    return d, {
        "decode": bench(["decode", *m, "--max-tokens", "8", "--prompt-tokens", "32"], d, "decode"),
        "prefill": bench(["prefill", *m, "--lengths", "32,100,1000"], d, "prefill"),
        "packing": bench(["packing", *m, "--lengths", "8,40,100"], d, "packing"),
        "memory": bench(["memory", *m, "--lengths", "64,160", "--max-tokens", "8"], d, "memory"),
    }


def test_every_scenario_records_settings_machine_and_each_repeat(results):
    _, r = results
    for name, rep in r.items():
        assert rep["kind"] == "bench" and rep["scenario"] == name
        assert rep["command"].startswith(f"slimlm bench {name} --model")
        assert {"cpu", "cores", "threads", "torch", "commit"} <= set(rep["machine"]) and rep["machine"]["threads"] == 1
        assert all(len(runs) == 1 and "error" not in runs[0] for runs in rep["runs"].values()), rep["runs"]
        assert "cpu_busy_others" in next(iter(rep["runs"].values()))[0]
    d = r["decode"]["summary"]
    assert set(d) - {"llama.cpp"} == {"slimlm", "transformers"}  # llama.cpp when llama-cpp-python is installed
    for s in d.values():
        assert finite(s["decode_tok_s"]["median"]) and s["generated"]["median"] == 8
        assert s["latency_p99_ms"]["median"] >= s["latency_p50_ms"]["median"] > 0
    assert finite(r["decode"]["speedup"]["transformers"])
    p = r["prefill"]
    assert p["settings"]["lengths"] == [32, 100, 255]  # clamped to the tiny model's context
    assert any("clamped" in n for n in p["notes"])
    assert all(finite(s[f"ttft_s[{n}]"]["median"]) for s in p["summary"].values() for n in (32, 100, 255))


def test_prefill_lengths_reach_a_rope_extensions_context(tiny_llama_dir, tmp_path):
    """--rope-extension lifts the cap from the trained context (256) to the extension's, as the
    engine does, and notes the lengths past the trained range; a bad extension is one line."""
    m = ["--model", str(tiny_llama_dir), "--skip", "transformers", "--skip", "llama.cpp"]
    rep = bench(["prefill", *m, "--lengths", "100,400,5000", "--rope-extension", "yarn",
                 "--rope-extension-arg", "context=1024"], tmp_path, "prefill-yarn")
    assert rep["settings"]["lengths"] == [100, 400, 1023]
    assert any("accepts 1024 tokens (trained: 256)" in n for n in rep["notes"])
    assert any("lengths 400, 1023 are past the model's trained context (256)" in n for n in rep["notes"])
    assert all(finite(rep["summary"]["slimlm"][f"ttft_s[{n}]"]["median"]) for n in (100, 400, 1023))
    assert main(["bench", "prefill", *m, "--rope-extension", "dca", "--rope-extension-arg", "chunk_size=300",
                 *FAST]) == 2


def test_llamacpp_missing_is_a_note_not_a_failure(results):
    import importlib.util

    _, r = results
    if importlib.util.find_spec("llama_cpp") is None:
        assert any("llama-cpp-python is not installed" in n for n in r["decode"]["notes"])
        assert "llama.cpp" not in r["decode"]["summary"]


def test_packing_computes_no_padding_and_matches_padded_logits(results, tiny_llama_dir):
    from slimlm.bench.packing import packed_last_logits, padded_last_logits
    from slimlm.model.hub import load

    _, r = results
    s = r["packing"]["summary"]
    assert set(s) == {"slimlm-padded", "slimlm-packed", "slimlm-engine", "transformers-padded"}
    assert s["slimlm-packed"]["computed_tokens"]["median"] == 148
    assert s["slimlm-padded"]["computed_tokens"]["median"] == s["transformers-padded"]["computed_tokens"]["median"] == 300
    model = load(tiny_llama_dir).model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 40)]
    with torch.inference_mode():
        torch.testing.assert_close(packed_last_logits(model, prompts), padded_last_logits(model, prompts),
                                   rtol=1e-4, atol=1e-4)
        alone = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
        torch.testing.assert_close(packed_last_logits(model, prompts), alone, rtol=1e-4, atol=1e-4)


def test_memory_kv_bytes_match_the_model_shape_and_a_kv_policy_saves_memory(results, tiny_llama_dir, tmp_path):
    _, r = results
    full = r["memory"]["summary"]
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x layers x KV heads x head dim x fp32 bytes
    assert full["transformers"]["kv_bytes_per_token[160]"]["median"] == pytest.approx(per_token, rel=0.02)
    assert per_token <= full["slimlm"]["kv_bytes_per_token[160]"]["median"] < per_token * 1.15  # block rounding
    assert finite(full["slimlm"]["peak_rss_mb[160]"]["median"])
    sink = bench(["memory", "--model", str(tiny_llama_dir), "--lengths", "64,160", "--max-tokens", "8",
                  "--skip", "transformers", "--kv-policy", "sink", "--kv-policy-arg", "window=32"], tmp_path, "sink")
    held = sink["summary"]["slimlm"]["kv_mb[160]"]["median"]
    assert held < 0.5 * full["slimlm"]["kv_mb[160]"]["median"]


def test_report_renders_every_result_and_skips_a_corrupt_file(results, tmp_path, capsys):
    d, _ = results
    (d / "corrupt.json").write_text('{"kind": "bench", "scenario": ')
    out = tmp_path / "docs" / "results.md"
    assert main(["report", str(d), "--out", str(out)]) == 0
    md = out.read_text()
    for name in ("decode", "prefill", "packing", "memory"):
        assert f"### {name} ({name}.json)" in md and f"`slimlm bench {name} --model" in md
    assert md.index("### decode") < md.index("### prefill") < md.index("### packing") < md.index("### memory")
    pngs = sorted(p.name for p in (tmp_path / "docs" / "results").glob("*.png"))
    assert pngs == ["decode.png", "memory-kv.png", "memory-rss.png", "packing.png", "prefill.png"]
    assert "![decode](results/decode.png)" in md
    err = capsys.readouterr().err
    assert "skipped" in err and "corrupt.json" in err and "Traceback" not in err
    assert "corrupt.json" in md.split("## Skipped")[1]


def test_worker_runs_in_its_own_process(tiny_llama_dir, tmp_path):
    out = tmp_path / "sub.json"
    assert main(["bench", "decode", "--model", str(tiny_llama_dir), "--max-tokens", "4", "--prompt-tokens", "16",
                 "--skip", "transformers", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"]["slimlm"][0]
    assert "error" not in run and run["generated"] == 4


def test_precisions_give_one_row_per_system_and_precision(tiny_llama_dir, tmp_path):
    r = bench(["decode", "--model", str(tiny_llama_dir), "--max-tokens", "4", "--prompt-tokens", "16",
               "--precisions", "fp32,int8,int4", "--skip", "llama.cpp"], tmp_path, "precisions")
    assert set(r["summary"]) == {"slimlm fp32", "slimlm int8", "slimlm int4", "transformers fp32"}
    assert all(s["generated"]["median"] == 4 for s in r["summary"].values())
    from slimlm.bench.precision import pair_ratios

    fake = {"slimlm int4": {"decode_tok_s": {"median": 30.0}}, "llama.cpp Q4_1": {"decode_tok_s": {"median": 20.0}}}
    assert pair_ratios(fake, {"int4": ["slimlm int4", "llama.cpp Q4_1"]}, "decode_tok_s", True) == {
        "int4 vs llama.cpp Q4_1": 1.5}


def test_peak_rss_is_the_workers_own():
    """VmHWM, not ru_maxrss: the latter survives exec and carried the parent's peak into workers."""
    import subprocess
    import sys

    big = bytearray(300 << 20)
    big[::4096] = b"x" * len(range(0, 300 << 20, 4096))  # touch every page: the parent's peak grows by 300 MB
    code = "from slimlm.bench.machine import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del big
    from slimlm.bench.machine import peak_rss_mb

    assert child < peak_rss_mb() - 200


def test_huge_pages_mb_reads_anon_huge_pages(tmp_path):
    """The decode report's huge_pages_mb is AnonHugePages of the process's smaps_rollup, in MB."""
    import sys

    from slimlm.bench.machine import huge_pages_mb

    f = tmp_path / "smaps_rollup"
    f.write_text("Rss:              789780 kB\nAnonHugePages:    526336 kB\nShmemHugePages:   0 kB\n")
    assert huge_pages_mb(str(f)) == 514.0
    assert huge_pages_mb(str(tmp_path / "missing")) is None
    if sys.platform.startswith("linux"):
        assert huge_pages_mb() >= 0


def test_frontier_shows_a_broken_configuration_as_a_quality_drop(trained_dir, tiny_data, tmp_path):
    r = bench(["frontier", "--model", str(trained_dir), "--prompt-tokens", "160", "--max-tokens", "8",
               "--config", "broken=--kv-policy sink --kv-policy-arg window=1 --kv-policy-arg sink=0",
               "--quality", "perplexity",
               "--quality-arg", f'perplexity.corpora=["{tiny_data["corpus"]}"]',
               "--quality-arg", "perplexity.window=128", "--quality-arg", "perplexity.stride=64"], tmp_path, "frontier")
    (p,) = [p for p in r["points"] if p["config"] == "broken"]
    assert p["quality_delta"] < -20  # perplexity at least 20% worse
    assert p["memory_saved_pct"] > 50  # the policy keeps one block instead of eleven
    assert r["settings"]["configs"]["broken"]["engine"]["kv_policy"] == "sink"
    out = tmp_path / "results.md"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert "## Efficiency frontier" in out.read_text() and (tmp_path / "results" / "frontier.png").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["bench", "nosuch"], "unknown scenario 'nosuch'; known: decode, frontier, kernels, memory, packing, prefill, serve, throughput"),
    (["bench", "decode", "--skip", "vllm"], "unknown system 'vllm' for --skip"),
    (["bench", "frontier"], "frontier needs at least one --config"),
    (["bench", "frontier", "--config", "x=--kv-policy nosuch"], "--kv-policy: invalid choice 'nosuch'; valid: h2o, minicache, shadowkv, sink, squeezed"),
    (["bench", "frontier", "--config", "x=--no-such-flag"], "--config: unrecognized arguments"),
])
def test_user_mistakes_are_one_line_exit_2(argv, needle, tiny_llama_dir, capsys):
    assert main([*argv, "--model", str(tiny_llama_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_throughput_and_serve_keep_their_options():
    p = build_parser()
    a = p.parse_args(["bench", "throughput", "--num-prompts", "4", "--max-tokens", "8", "--skip", "transformers"])
    assert (a.scenario, a.num_prompts, a.max_tokens, a.skip) == ("throughput", 4, 8, ["transformers"])
    a = p.parse_args(["bench", "serve", "--clients", "3", "--seconds", "2", "--kv-policy", "sink"])
    assert (a.clients, a.seconds, a.kv_policy) == (3, 2.0, "sink")


def test_kernels_times_both_paths_and_notes_what_it_cannot_serve(tiny_llama_dir, tmp_path, capsys):
    """The tiny model's head size (16) is too small for paged_prefill: a note, PyTorch timings only;
    decode runs on both paths. A head-size-64 model gets the prefill kernel too."""
    from tests.conftest import make_hf_model

    from slimlm import kernels

    args = ["kernels", "--lengths", "40,70", "--batch", "3", "--dtype", "float32"]
    rep = bench([*args, "--model", str(tiny_llama_dir)], tmp_path, "k16")
    assert rep["settings"]["head_dim"] == 16 and rep["settings"]["batch"] == 3
    for n in (40, 70):
        assert finite(rep["summary"][f"prefill[{n}]/pytorch"]["ms"]["median"])
        assert finite(rep["summary"][f"decode[{n}]/pytorch"]["ms"]["median"])
        if kernels.load("paged_decode") is not None:
            assert finite(rep["summary"][f"decode[{n}]/native"]["ms"]["median"])
        assert f"prefill[{n}]/native" not in rep["summary"]
    assert any("paged_prefill" in n for n in rep["notes"])
    assert "| prefill, 1 x 40 tokens |" in capsys.readouterr().out

    d64 = tmp_path / "d64"
    make_hf_model(d64, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    rep = bench([*args, "--model", str(d64)], tmp_path, "k64")
    lib = kernels.load("paged_prefill")
    if lib is not None and lib.slimlm_prefill_supported(64, 0):
        assert finite(rep["summary"]["prefill[70]/native"]["ms"]["median"]) and not rep["notes"]


def test_throughput_sweeps_transformers_batch_sizes_and_compares_with_the_best(monkeypatch):
    from slimlm.bench import runner, throughput

    speeds = {"slimlm": 100.0, "transformers bs8": 10.0, "transformers bs16": 25.0, "transformers bs32": 20.0}
    seen = {}

    def fake(jobs, repeats, log):
        seen.update({k: a.get("hf_batch") for k, (_, a) in jobs.items()})
        return {k: [{"tokens_per_s": speeds[k], "seconds": 1.0}] for k in jobs}

    monkeypatch.setattr(runner, "interleave", fake)
    monkeypatch.setattr("slimlm.bench.machine.cpu_busy", lambda *a: 0.0)
    r = throughput.run("m", hf_batches=(8, 16, 32), repeats=1, log=lambda *_: None)
    assert seen == {"slimlm": None, "transformers bs8": 8, "transformers bs16": 16, "transformers bs32": 32}
    assert r["best_transformers"] == "transformers bs16" and r["speedup"] == 4.0


def test_throughput_table_says_what_speculation_did():
    """A speculative method's row is followed by its acceptance and how many steps verified
    drafts or ran with speculation off (``max_batch``)."""
    from slimlm.bench.throughput import table

    med = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    s = {"tokens_per_s": med(50.0), "computed_prompt_tokens": med(10), "prompt_tokens": med(10), "peak_rss_mb": med(1),
         "draft_tokens": med(400), "accepted_draft_tokens": med(100), "verify_steps": med(100), "steps": med(300),
         "speculation_off_steps": med(190)}
    out = table({"summary": {"slimlm": s}})
    assert "acceptance 0.250, 100 of 300 steps verified drafts, 190 steps with speculation off" in out


def test_steal_time_is_measured_per_run_and_flagged():
    """A run overlapping the hypervisor's other guests (steal time in /proc/stat) is flagged, since
    ``cpu_busy`` sees only this machine's processes; the share is steal ticks over all ticks."""
    from slimlm.bench.base import busy_warning
    from slimlm.bench.machine import cpu_ticks, steal_share

    ticks = cpu_ticks()
    assert ticks is None or (ticks[0] >= ticks[1] >= 0)
    assert steal_share((1000, 10), (2000, 110)) == 0.1
    assert steal_share((1000, 10), (1000, 10)) == 0.0 and steal_share(None, (5, 1)) == 0.0
    quiet = {"runs": {"a": [{"cpu_steal": 0.01}], "b": [{"cpu_steal": 0.02}]}}
    busy_warning(quiet, [0.0], log=lambda *_: None)
    assert quiet["cpu_steal_max"] == 0.02 and not quiet.get("notes")
    noisy = {"runs": {"a": [{"cpu_steal": 0.01}, {"cpu_steal": 0.3}]}}
    logged = []
    busy_warning(noisy, [0.0], log=logged.append)
    assert noisy["cpu_steal_max"] == 0.3 and "steal time" in noisy["notes"][0] and "30%" in logged[0]


def test_speed_probe_and_drift_warning():
    """The probe measures something positive; runs whose probes differ by more than 15 % are flagged
    (the report keeps max / min per probe), runs within it are not."""
    from slimlm.bench.base import busy_warning
    from slimlm.bench.machine import speed_probe

    p = speed_probe(rounds=1)
    assert p["probe_gflops"] > 0 and p["probe_gbs"] > 0
    steady = {"runs": {"a": [{"probe_gflops": 100.0, "probe_gbs": 10.0}], "b": [{"probe_gflops": 110.0, "probe_gbs": 10.5}]}}
    busy_warning(steady, [0.0], log=lambda *_: None)
    assert steady["machine_speed_drift"]["probe_gflops"] == 1.1 and not steady.get("notes")
    drifting = {"runs": {"a": [{"probe_gflops": 100.0, "probe_gbs": 10.0}, {"probe_gflops": 160.0, "probe_gbs": 10.0}]}}
    busy_warning(drifting, [0.0], log=lambda *_: None)
    assert "drifted" in drifting["notes"][0] and "1.60x" in drifting["notes"][0]
