"""`slimlm train` and `slimlm schedule plot` end to end, and bad input as one-line errors."""

from __future__ import annotations

import pytest

from slimlm.cli import main
from tests.train.helpers import tiny_args


def one_line_error(capsys, argv, *words):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_train_then_plot(prepared, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[schedule]\nname = "cosine"\nlr = 1e-3\nwarmup_steps = 1\n')
    assert main(["train", str(cfg), *tiny_args(prepared, tmp_path / "run", "--schedule.name", "cosine"),
                 "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "done: 3 updates, 384 tokens; loss" in err and "val_loss/tokens" in err
    png = tmp_path / "p.png"
    assert main(["schedule", "plot", str(cfg), "--steps", "50", "--out", str(png), "--runs", str(tmp_path / "run")]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_input(prepared, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nsteps = 2\n')
    one_line_error(capsys, ["train", str(cfg), "--train.stepz", "3"], "unknown config key 'train.stepz'", "grad_accum")
    one_line_error(capsys, ["train", str(cfg)], "no training data")
    one_line_error(capsys, ["train", str(cfg), "--data.train", str(tmp_path)], "not prepared")
    one_line_error(capsys, ["train", str(cfg), *tiny_args(prepared, tmp_path / "r", "--data.seq_len", "4096")],
                   "beyond the model's context (1024")
    one_line_error(capsys, ["train", str(cfg), *tiny_args(prepared, tmp_path / "r", "--model.preset", "huge")],
                   "unknown model preset 'huge'", "tiny-15m")
    one_line_error(capsys, ["train", str(cfg), *tiny_args(prepared, tmp_path / "r", "--optim.name", "sgdd")],
                   "unknown optimizer 'sgdd'", "adamw, galore, gradnorm_lorp, lamb")
    # a checkpoint of another shape, and a corrupt one asked for by name
    assert main(["train", str(cfg), *tiny_args(prepared, tmp_path / "r", "--steps", "1")]) == 0
    one_line_error(capsys, ["train", str(cfg), *tiny_args(prepared, tmp_path / "r", "--model.vocab_size", "448")],
                   "another model shape", "vocab_size 384 vs 448")
    w = tmp_path / "r" / "checkpoints" / "step-00000001" / "optimizer.pt"
    w.write_bytes(b"garbage")
    one_line_error(capsys, ["train", str(cfg), *tiny_args(prepared, tmp_path / "s", "--checkpoint.resume_from",
                                                         str(w.parent))], "corrupt")


@pytest.mark.parametrize("argv,words", [
    (["schedule", "plot", "/nonexistent.toml"], ["not found"]),
    (["tokenizer", "train", "/nonexistent-dir", "--out", "/tmp/x"], ["neither a file"]),
])
def test_other_commands_bad_input(capsys, argv, words):
    one_line_error(capsys, argv, *words)


def test_time_budget_flag(prepared, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    argv = ["train", str(cfg), *tiny_args(prepared, tmp_path / "r", "--steps", "100000", "--checkpoint.every", "0",
                                          "--train.budget_probe_steps", "2"), "--time-budget", "0.003"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "time budget 0.003 min at" in err and "done: " in err
    assert "done: 100000 updates" not in err


def test_abf_raises_the_rope_base_and_the_context(prepared, tmp_path, capsys):
    import json

    from slimlm.model.hub import load

    run = tmp_path / "abf"
    conf = tmp_path / "abf.toml"
    conf.write_text("[train]\nsteps = 2\n")
    assert main(["train", str(conf), *tiny_args(prepared, run, "--model.rope_theta", "500000", "--model.context_length", "4096",
                                     "--data.seq_len", "128"), "--steps", "2"]) == 0
    ckpts = sorted(p for p in run.rglob("config.json"))
    cfg = json.loads(ckpts[-1].read_text())
    assert cfg["rope_theta"] == 500000 and cfg["max_position_embeddings"] == 4096
    lm = load(str(ckpts[-1].parent))
    assert lm.model.cfg.rope_theta == 500000
    assert float(lm.model.rotary.inv_freq[1]) == pytest.approx(500000 ** (-2 / lm.model.cfg.head_dim), rel=1e-5)
    one_line_error(capsys, ["train", str(conf), *tiny_args(prepared, tmp_path / "bad", "--model.rope_theta", "-1")],
                   "model.rope_theta must be positive")


@pytest.fixture(scope="module")
def source_2_layers(tmp_path_factory, prepared):
    """A saved 2-layer micro model with the test data's vocabulary (a G_stack growth source)."""
    from slimlm.data.tokens import TokenDataset
    from slimlm.model.weights import save_model_dir
    from slimlm.train.presets import model_config, new_model

    vocab = -(-TokenDataset(prepared, "train").meta.vocab_size // 64) * 64
    return save_model_dir(new_model(model_config("micro", vocab)), tmp_path_factory.mktemp("src") / "m")


@pytest.mark.parametrize("extra,words", [
    (("--optim.name", "galore", "--optim.galore.rank", "65"), ["optim.galore.rank 65 is larger than a dimension"]),
    (("--model.norm_placement", "mix", "--model.post_ln_fraction", "1.5"), ["model.post_ln_fraction", "[0, 1]"]),
    (("--model.growth.factor", "1.25"), ["model.growth.factor 1.25 gives 2.5 layers from 2"]),
    (("--model.moe.num_experts", "4", "--model.moe.top_k", "5"), ["model.moe.top_k 5", "model.moe.num_experts 4"]),
    (("--objective.next_token", "0"), ["objective weights", "sum to a positive value"]),
    (("--model.parameterization", "mup", "--model.mup.base_width", "-64"), ["model.mup.base_width"]),
], ids=["galore-rank", "post-ln-fraction", "growth-factor", "moe-top-k", "mixture-weights", "mup-base-width"])
def test_issue15_bad_input_is_one_line_before_any_step(prepared, tmp_path, capsys, source_2_layers, extra, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nsteps = 2\n')
    if "--model.growth.factor" in extra:
        extra = (*extra, "--model.growth.source", str(source_2_layers))
    one_line_error(capsys, ["train", str(cfg), *tiny_args(prepared, tmp_path / "r", *extra)], *words)
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()
