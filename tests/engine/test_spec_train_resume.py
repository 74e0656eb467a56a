"""Resumable draft training (`slimlm train-adapter --checkpoint DIR --resume`): a run stopped or
crashed part-way and resumed ends with the same parameters, to the bit, as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from slimlm.compress.spec_train import Checkpoint, _fit
from slimlm.errors import SlimLMError
from slimlm.model.hub import load


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load(tiny_llama_dir)


def _windows(target, n=6, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, target.model.cfg.vocab_size, (n, length), generator=g)


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _toy(seed=0):
    """A parameter, a generator and a loss that draws its batch from the generator."""
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(99))  # the data: the same for every seed

    def loss_of(step):
        idx = torch.randint(0, 64, (8,), generator=g)
        return ((x[idx] @ w).tanh() - 0.5).pow(2).mean()

    return w, g, loss_of


def test_fit_resumed_after_a_crash_equals_the_uninterrupted_run(tmp_path):
    """A crash at step 7 with checkpoints every 3 steps loses steps 6-7 only; resuming from step 6
    (parameters, AdamW moments, the warm-up/decay schedule, the sampler's RNG) ends bit-equal."""
    w0, g0, loss0 = _toy()
    last0, run0 = _fit([w0], 1e-2, 12, loss0, None, 100, "loss", warmup=4)
    assert run0["steps_done"] == 12 and run0["resumed_from"] is None

    w1, g1, loss1 = _toy()

    def crashing(step):
        if step == 7:
            raise KeyboardInterrupt
        return loss1(step)

    ck = Checkpoint(str(tmp_path), every=3)
    with pytest.raises(KeyboardInterrupt):
        _fit([w1], 1e-2, 12, crashing, None, 100, "loss", warmup=4, ckpt=ck, rngs=(g1,))
    state = torch.load(ck.path, weights_only=True)
    assert state["step"] == 6  # the last checkpoint before the crash
    assert not torch.equal(w1.detach(), w0.detach())

    w2, g2, loss2 = _toy(seed=5)  # another init and sampler state: the checkpoint must overwrite both
    last2, run2 = _fit([w2], 1e-2, 12, loss2, None, 100, "loss", warmup=4, ckpt=Checkpoint(str(tmp_path), every=3),
                       state=state, rngs=(g2,))
    assert run2["steps_done"] == 12 and run2["resumed_from"] == 6
    assert torch.equal(w2.detach(), w0.detach()) and last2 == last0


@pytest.mark.parametrize("method", ["chimera", "attention", "kangaroo"])
def test_trainer_stopped_and_resumed_equals_uninterrupted(target, tmp_path, method):
    """Each trainer with ``stop_at`` half-way, then resumed in a fresh call: the same adapter
    weights and final loss as one uninterrupted run; the stopped run's adapter is the
    half-trained one and says so."""
    from slimlm.compress.chimera_attn_train import AttnTrainConfig, train_chimera_attn
    from slimlm.compress.spec_train import AdapterTrainConfig, ChimeraTrainConfig, train_chimera, train_kangaroo

    win = _windows(target)
    if method == "chimera":
        cfg = ChimeraTrainConfig(depth=2, head_vocab=0, steps=6, batch_size=16, lr=3e-3)
        train = lambda ck: train_chimera(target.model, win, cfg, None, ck)  # noqa: E731
    elif method == "attention":
        cfg = AttnTrainConfig(depth=2, head_vocab=0, steps=6, batch_size=2, lr=3e-3)
        train = lambda ck: train_chimera_attn(target.model, win, cfg, "tiny", None, ck)  # noqa: E731
    else:
        cfg = AdapterTrainConfig(exit_layer=1, head_vocab=0, steps=6, batch_size=2, lr=3e-3)
        train = lambda ck: train_kangaroo(target.model, win, cfg, None, ck)  # noqa: E731
    full, meta_full = train(None)
    half, meta_half = train(Checkpoint(str(tmp_path), every=2, stop_at=3))
    assert meta_half["train"]["steps_done"] == 3 and meta_full["train"]["steps_done"] == 6
    assert not _same(_state(half), _state(full))
    resumed, meta = train(Checkpoint(str(tmp_path), every=2, resume=True))
    tr = meta["train"]
    assert tr["resumed_from"] == 3 and tr["steps_done"] == 6
    assert _same(_state(resumed), _state(full))
    assert tr["final_loss"] == meta_full["train"]["final_loss"]
    assert tr["heldout_top1_agreement_init"] == meta_full["train"]["heldout_top1_agreement_init"]
    assert tr["heldout_top1_agreement"] == meta_full["train"]["heldout_top1_agreement"]


def test_resume_of_another_run_or_of_nothing_is_refused(target, tmp_path):
    from slimlm.compress.spec_train import ChimeraTrainConfig, train_chimera

    win = _windows(target)
    cfg = ChimeraTrainConfig(depth=2, head_vocab=0, steps=4, batch_size=8)
    with pytest.raises(SlimLMError, match="no checkpoint") as e:
        train_chimera(target.model, win, cfg, None, Checkpoint(str(tmp_path / "none"), resume=True))
    assert "\n" not in str(e.value)
    train_chimera(target.model, win, cfg, None, Checkpoint(str(tmp_path), stop_at=2))
    other = ChimeraTrainConfig(depth=2, head_vocab=0, steps=6, batch_size=8)
    with pytest.raises(SlimLMError, match="another run .*steps") as e:
        train_chimera(target.model, win, other, None, Checkpoint(str(tmp_path), resume=True))
    assert "\n" not in str(e.value)
    with pytest.raises(SlimLMError, match="another run .*windows"):
        train_chimera(target.model, _windows(target, seed=1), cfg, None, Checkpoint(str(tmp_path), resume=True))


def test_train_adapter_cli_resumes_and_shares_the_feature_cache(tiny_llama_dir, tmp_path, capsys):
    """The CLI: --stop-at writes the half-trained adapter, --resume finishes it with the weights
    of an uninterrupted run (which computed the bfloat16 features the resumed run reads: the
    target's weights are rounded alike either way); the MLP draft reads the features the
    attention draft cached; --resume without --checkpoint is a one-line error."""
    from safetensors.torch import load_file

    from slimlm.cli import main

    text = tmp_path / "text.txt"
    text.write_text("Small language models are fast to serve and cheap to train. " * 60)
    cache = str(tmp_path / "features")
    base = ["--model", str(tiny_llama_dir), "--data", str(text), "--tokens", "512", "--seq-len", "32", "--method",
            "chimera", "--decoder", "attention", "--depth", "2", "--steps", "6", "--batch-size", "2",
            "--head-vocab", "64", "--feature-cache", cache, "--feature-dtype", "bfloat16"]
    ck = ["--checkpoint", str(tmp_path / "ck"), "--checkpoint-every", "2"]
    assert main(["train-adapter", str(tmp_path / "full"), *base]) == 0
    capsys.readouterr()
    assert main(["train-adapter", str(tmp_path / "half"), *base, *ck, "--stop-at", "3"]) == 0
    assert "at step 3 of 6 (--resume continues)" in capsys.readouterr().err
    assert main(["train-adapter", str(tmp_path / "end"), *base, *ck, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resumed at step 3 of 6" in err and "features read from" in err
    full = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    end = load_file(str(tmp_path / "end" / "adapter.safetensors"))
    half = load_file(str(tmp_path / "half" / "adapter.safetensors"))
    assert all(torch.equal(full[k], end[k]) for k in full) and not all(torch.equal(full[k], half[k]) for k in full)
    mlp = list(base)
    mlp[mlp.index("--decoder") + 1] = "mlp"
    mlp[mlp.index("--batch-size") + 1] = "16"
    assert main(["train-adapter", str(tmp_path / "mlp"), *mlp]) == 0
    assert "features read from" in capsys.readouterr().err
    assert main(["train-adapter", str(tmp_path / "x"), *base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and len(err.strip().splitlines()) == 1


def test_feature_cache_stopped_part_way_computes_only_the_rest(target, tmp_path, monkeypatch):
    """The target's features go to part files while the cache fills: a run stopped after two
    parts leaves them, the next computes only the remaining parts, and the cache holds the same
    values as one uninterrupted pass."""
    import slimlm.compress.chimera_attn_train as cat
    from slimlm.compress.chimera_attn_train import AttnTrainConfig, _cached_features

    win = _windows(target, n=12, length=16)
    cfg = AttnTrainConfig(head_vocab=0, feature_batch=2, feature_cache=str(tmp_path))
    tm0, H0, Z0, _ = _cached_features(target.model, win, AttnTrainConfig(head_vocab=0, feature_batch=2), "t", None)
    monkeypatch.setattr(cat, "FEATURE_PART", 4)
    real, calls = cat._final_features, []

    def stopping(*a, **k):
        calls.append(a[1].shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cat, "_final_features", stopping)
    with pytest.raises(KeyboardInterrupt):
        _cached_features(target.model, win, cfg, "t", None)
    assert len(list(tmp_path.glob("*.part*.safetensors"))) == 2
    monkeypatch.setattr(cat, "_final_features", lambda *a, **k: (calls.append(a[1].shape[0]), real(*a, **k))[1])
    tm, H, Z, _ = _cached_features(target.model, win, cfg, "t", None)
    assert calls == [4, 4, 4, 4]  # parts 0, 1, the stopped part 2, then only part 2 again
    assert not list(tmp_path.glob("*.part*")) and len(list(tmp_path.glob("features-*.safetensors"))) == 1
    assert tm is None and tm0 is None and torch.equal(H, H0) and torch.equal(Z[0], Z0[0]) and torch.equal(Z[1], Z0[1])
    monkeypatch.setattr(cat, "_final_features", None)  # read from the cache: no target forward at all
    tm, H2, Z2, _ = _cached_features(target.model, win, cfg, "t", None)
    assert torch.equal(H2, H0) and torch.equal(Z2[1], Z0[1])
