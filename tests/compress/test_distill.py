"""Distillation as a trainer objective: KL zero for student = teacher, loss falls, resume, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from slimlm.cli import main
from slimlm.compress.distill import DistillConfig, DistillObjective, kl_sum
from slimlm.compress.importance import measure
from slimlm.compress.prune import PruneConfig, prune
from slimlm.data.loader import PackedLoader
from slimlm.data.tokens import TokenDataset
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from slimlm.model.weights import save_model_dir
from slimlm.train.metrics import read_metrics
from slimlm.train.trainer import loss_sum
from tests.conftest import make_hf_model
from tests.train.helpers import tiny_args

from tests.train.conftest import one_thread, prepared, tokenizer_dir  # noqa: F401,E402  (shared fixtures)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("teacher")
    make_hf_model(path, "llama", num_hidden_layers=3)
    return path


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory):
    lm = load(teacher_dir)
    imp = measure(lm.model, torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0)))
    pruned, _ = prune(lm.model, imp, PruneConfig(hidden=32, heads=2, intermediate=64, layers=2))
    path = tmp_path_factory.mktemp("student")
    save_model_dir(pruned, path, lm.tokenizer)
    import json

    (path / "prune_report.json").write_text(json.dumps({"kept_layers": _.layers, "kept_channels": _.channels.tolist()}))
    return path


def batch(prepared):
    return PackedLoader([TokenDataset(prepared, "train")], 32, 2, None, "document", 0, 1, 0).next_batch()


def test_kl_is_zero_when_student_is_teacher(teacher_dir, prepared):
    model = load(teacher_dir).model
    obj = DistillObjective(DistillConfig(teacher="x", hidden_weight=1.0), copy.deepcopy(model), model)
    # the teacher runs without autograd, so it takes the native elementwise kernels (SiLU x up on
    # exp512, within a few ulp of PyTorch's: kernels/elementwise.c) while the student trains on
    # PyTorch's ops: zero up to that rounding
    assert abs(obj(model, batch(prepared), 0).item()) < 1e-5
    x = torch.randn(5, 11)
    assert kl_sum(x, x, 2.0).item() == 0.0 and kl_sum(x, x.flip(0), 2.0).item() > 0


def test_kl_matches_its_definition():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    torch.testing.assert_close(kl_sum(s, t, 2.0), (p * (p.log() - q.log())).sum() * 4)


def test_salt_switches_the_teacher_off(teacher_dir, prepared):
    model = load(teacher_dir).model

    class Refuses(torch.nn.Module):
        cfg = model.cfg

        def forward(self, *a, **k):
            raise AssertionError("teacher ran after teacher_until_step")

    obj = DistillObjective(DistillConfig(teacher="x", teacher_until_step=3), Refuses(), model)
    b = batch(prepared)
    assert obj.uses_teacher(2) and not obj.uses_teacher(3)
    torch.testing.assert_close(obj(model, b, 3), loss_sum(model, b))


def distill_args(prepared, student_dir, teacher_dir, out, *extra):
    config = out.parent / f"{out.name}.toml"
    config.write_text(f'[model]\ninit_from = "{student_dir}"\n[distill]\nteacher = "{teacher_dir}"\n'
                      'hidden_weight = 0.5\ntemperature = 2.0\n')
    return ["distill", str(config),
            *tiny_args(prepared, out, "--train.steps", "8", "--schedule.warmup_steps", "1", "--checkpoint.every", "4",
                       *extra)]


def test_distill_loss_falls_and_resumes_step_exactly(prepared, student_dir, teacher_dir, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main([a for a in distill_args(prepared, student_dir, teacher_dir, ref)]) == 0
    err = capsys.readouterr().err
    assert "distilling from" in err and "done: 8 updates" in err
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r}
    assert ref_losses[8] < ref_losses[1]
    # killed after update 5 (checkpoint at 4), then resumed: the same losses, update for update
    from slimlm.compress.cli import cmd_distill  # noqa: F401  (the same code path as the CLI)
    from slimlm.compress.distill import load_teacher
    from slimlm.compress.run_config import load_run
    from slimlm.train.trainer import Trainer

    run = tmp_path / "run"
    args = distill_args(prepared, student_dir, teacher_dir, run)
    cfg, dcfg = load_run(args[1], args[2:], "distill", DistillConfig)
    t = Trainer(cfg)
    t.objective = DistillObjective(dcfg, load_teacher(dcfg, t.model, t.tokenizer, t.world.device), t.model,
                                   cfg.model.init_from)
    t.fit(max_updates=5)
    t.close()
    assert main(distill_args(prepared, student_dir, teacher_dir, run)) == 0
    assert "resumed from" in capsys.readouterr().err
    got = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert got == ref_losses


def test_teacher_with_another_vocabulary_is_refused(prepared, student_dir, tmp_path, capsys):
    other = tmp_path / "other"
    make_hf_model(other, "llama", vocab_size=512)
    rc = main(distill_args(prepared, student_dir, other, tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "teacher vocabulary (512 tokens) differs from the student's (384)" in err


def test_bad_distill_config_is_one_line(prepared, student_dir, teacher_dir, tmp_path, capsys):
    rc = main(distill_args(prepared, student_dir, teacher_dir, tmp_path / "o", "--distill.temperature", "0"))
    assert rc == 2 and "distill.temperature must be > 0" in capsys.readouterr().err
    with pytest.raises(SlimLMError, match="valid keys in \\[distill\\]"):
        from slimlm.compress.run_config import load_run

        load_run(None, ["--distill.teacher", "x", "--distill.nope", "1"], "distill", DistillConfig)


def test_top_k_kl_over_the_whole_vocabulary_is_the_full_kl():
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    torch.testing.assert_close(kl_sum(s, t, 1.5, top_k=9), kl_sum(s, t, 1.5))
    assert kl_sum(s, t, 1.0, top_k=2).item() != kl_sum(s, t, 1.0).item()


# ---------------------------------------------------------------- learned projection, offline top-k cache


def test_learned_projection_distils_a_student_of_another_width(prepared, teacher_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    narrow = tmp_path / "narrow"  # not made by prune: no prune_report.json, width 48 vs the teacher's 64
    make_hf_model(narrow, "llama", hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "run"
    args = distill_args(prepared, narrow, teacher_dir, out, "--train.steps", "4", "--checkpoint.every", "2")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "learned hidden-state projection" in err
    ck = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    first = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert ck["distill_proj.0.weight"].shape == (64, 48)  # student width -> teacher width, trained
    assert not torch.equal(ck["distill_proj.0.weight"], first["distill_proj.0.weight"])
    final = load(out / "final")  # the distilled student, without the projection
    assert final.model.cfg.hidden_size == 48 and not hasattr(final.model, "distill_proj")
    assert "distill_proj.0.weight" not in load_file(out / "final" / "model.safetensors")


def test_learned_projection_starts_as_the_identity(teacher_dir, prepared):
    from slimlm.compress.distill import add_projection

    model = load(teacher_dir).model
    plain = DistillObjective(DistillConfig(teacher="x", hidden_weight=1.0, kl_weight=0), copy.deepcopy(model).eval(),
                             model)
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # differ from the teacher
    add_projection(student, model.cfg.hidden_size)
    learned = DistillObjective(DistillConfig(teacher="x", hidden_weight=1.0, kl_weight=0, projection="learned"),
                               model, student)
    b = batch(prepared)
    got = learned(student, b, 0)
    ref = DistillObjective(DistillConfig(teacher="x", hidden_weight=1.0, kl_weight=0), model, student)
    torch.testing.assert_close(got, ref(student, b, 0))  # identity init: the plain MSE
    got.backward()
    assert student.distill_proj[0].weight.grad.abs().sum() > 0
    del plain


def cache_args(prepared, student_dir, teacher_dir, out, cache, *extra):
    config = out.parent / f"{out.name}.toml"
    config.write_text(f'[model]\ninit_from = "{student_dir}"\n[distill]\nteacher = "{teacher_dir}"\n'
                      f'top_k = 16\ntemperature = 2.0\ntopk_cache = "{cache}"\n')
    return [str(config), *tiny_args(prepared, out, "--train.steps", "4", "--schedule.warmup_steps", "1",
                                    "--checkpoint.every", "2", *extra)]


def test_cached_top_k_loss_equals_the_online_top_k_loss(prepared, student_dir, teacher_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = cache_args(prepared, student_dir, teacher_dir, tmp_path / "cached", cache)
    assert main(["distill-cache", *args]) == 0
    assert "top-16 logits" in capsys.readouterr().err
    assert main(["distill", *args]) == 0  # from the cache: the teacher is not loaded
    assert "distilling from the top-k cache" in capsys.readouterr().err
    online = cache_args(prepared, student_dir, teacher_dir, tmp_path / "online", "")
    assert main(["distill", *online]) == 0  # the same run, top-k computed from the teacher every step
    got = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / p / "metrics.jsonl") if "loss" in r}
           for p in ("cached", "online")]
    assert len(got[0]) == 4 and got[0].keys() == got[1].keys()
    for s in got[0]:
        assert got[0][s] == pytest.approx(got[1][s], rel=1e-5), s


def test_cached_top_k_equals_online_per_batch(prepared, student_dir, teacher_dir, tmp_path):
    from slimlm.compress.topk_cache import TopKCache, write_cache

    teacher, student = load(teacher_dir).model.eval(), load(student_dir).model
    loader = PackedLoader([TokenDataset(prepared, "train")], 32, 2, None, "document", 0, 1, 0)
    write_cache(teacher, loader, 3, 8, tmp_path / "c", {"vocab_size": 384})
    cache = TopKCache(tmp_path / "c")
    cfg = DistillConfig(teacher="x", top_k=8, temperature=1.5, topk_cache=str(tmp_path / "c"))
    cached = DistillObjective(cfg, None, student, cache=cache)
    online = DistillObjective(DistillConfig(teacher="x", top_k=8, temperature=1.5), teacher, student)
    again = PackedLoader([TokenDataset(prepared, "train")], 32, 1, None, "document", 0, 1, 0)  # other micro-batches
    for step in range(6):
        b = again.next_batch()
        with torch.no_grad():
            torch.testing.assert_close(cached(student, b, step), online(student, b, step), rtol=1e-5, atol=1e-5)
    other = PackedLoader([TokenDataset(prepared, "train")], 32, 2, None, "document", 0, 1, 7).next_batch()
    with pytest.raises(SlimLMError, match="not in the top-k cache"):
        cached(student, other, 0)


def test_bad_cache_settings_are_one_line(prepared, student_dir, teacher_dir, tmp_path, capsys):
    args = cache_args(prepared, student_dir, teacher_dir, tmp_path / "x", tmp_path / "nocache")
    assert main(["distill", *args]) == 2
    assert "is not a top-k cache" in capsys.readouterr().err
    assert main(["distill", *args, "--distill.top_k", "0"]) == 2
    assert "distill.topk_cache needs distill.top_k" in capsys.readouterr().err
    assert main(["distill", *args, "--distill.projection", "mlp"]) == 2
    assert "distill.projection must be 'auto' or 'learned'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["salt", "projection", "topk-cache", "lowrank"])
def test_every_distill_mode_resumes_step_exactly(prepared, student_dir, teacher_dir, tmp_path, mode, monkeypatch,
                                                 capsys):
    """A run killed after update 5 (checkpoint at 4) and started again continues step for step."""
    from slimlm.train.trainer import Trainer

    student, section = student_dir, 'top_k = 16\ntemperature = 2.0\n'
    if mode == "salt":
        section += "teacher_until_step = 6\nhidden_weight = 0.5\n"
    elif mode == "projection":
        student = tmp_path / "narrow"
        make_hf_model(student, "llama", hidden_size=48, intermediate_size=96)
        section += 'hidden_weight = 0.5\nprojection = "learned"\n'
    elif mode == "topk-cache":
        section += f'topk_cache = "{tmp_path / "cache"}"\n'
    else:
        student = tmp_path / "lr"
        assert main(["lowrank", str(teacher_dir), str(student), "--rank", "8", "--calib", str(prepared),
                     "--calib-tokens", "128", "--seq-len", "32"]) == 0
        section += "lowrank = true\n"

    def args(out):
        config = tmp_path / f"{out}.toml"
        config.write_text(f'[model]\ninit_from = "{student}"\n[distill]\nteacher = "{teacher_dir}"\n{section}')
        return [str(config), *tiny_args(prepared, tmp_path / out, "--train.steps", "8", "--checkpoint.every", "4")]

    if mode == "topk-cache":
        assert main(["distill-cache", *args("ref")]) == 0
    assert main(["distill", *args("ref")]) == 0
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, max_updates=None: fit(self, 5))
    assert main(["distill", *args("cut")]) == 0  # stopped after update 5, as if killed
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "final").exists()
    assert main(["distill", *args("cut")]) == 0
    assert "resumed from" in capsys.readouterr().err

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / out / "metrics.jsonl") if "loss" in r}

    assert losses("cut") == losses("ref") and len(losses("ref")) == 8


def test_teacher_with_another_tokenizer_of_the_same_size_is_refused(prepared, student_dir, teacher_dir, tmp_path,
                                                                      capsys):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two tokens swapped
    (other / "tokenizer.json").write_text(json.dumps(tj))
    rc = main(distill_args(prepared, student_dir, other, tmp_path / "o"))
    assert rc == 2 and "teacher and student tokenizers differ" in capsys.readouterr().err
