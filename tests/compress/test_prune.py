"""Minitron pruning on a tiny model: equal to a masked reference, loadable by transformers, bad targets."""

from __future__ import annotations

import pytest
import torch

from slimlm.cli import main
from slimlm.compress.importance import measure
from slimlm.compress.prune import PruneConfig, masked_copy, prune
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from tests.conftest import make_hf_model


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("prune-src")
    make_hf_model(path, "llama", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    return path


def windows(n=4, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, t), generator=g)


def skipping_forward(model, ids, skip):
    h = model.embed(ids)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    cos, sin = model.rotary(pos, h.dtype)
    attn = model.dense_attention(pos)
    for i, layer in enumerate(model.model.layers):
        if i not in skip:
            h = layer(h, cos, sin, attn)
    return model.head(h)


CASES = {
    "heads": PruneConfig(heads=2),
    "kv_heads": PruneConfig(kv_heads=1, heads=2),
    "neurons": PruneConfig(intermediate=48),
    "hidden": PruneConfig(hidden=40, heads=4),
    "layers": PruneConfig(layers=2),
    "drop": PruneConfig(drop_layers=[0, 2]),
    "all": PruneConfig(hidden=32, intermediate=64, heads=2, kv_heads=1, layers=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_logits_equal_the_masked_reference(src_dir, case):
    model = load(src_dir).model.float()
    imp = measure(model, windows())
    pruned, plan = prune(model, imp, CASES[case])
    ref, skip = masked_copy(model, plan)
    ids = windows(2, 16, seed=1)
    with torch.no_grad():
        expect = skipping_forward(ref, ids, skip)
        got = pruned(ids)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_ranking_keeps_the_most_important_units(src_dir):
    model = load(src_dir).model.float()
    imp = measure(model, windows())
    _, plan = prune(model, imp, PruneConfig(intermediate=16, layers=2))
    assert sorted(plan.layers) == sorted(torch.argsort(imp.layers, descending=True)[:2].tolist())
    l = plan.layers[0]
    kept = imp.neurons[l][plan.neurons[l]]
    dropped = torch.ones(imp.neurons.shape[1], dtype=torch.bool)
    dropped[plan.neurons[l]] = False
    assert kept.min() >= imp.neurons[l][dropped].max()


def test_cli_writes_a_dir_that_transformers_loads(src_dir, tmp_path, capsys):
    import transformers

    from tests.data.conftest import make_corpus

    corpus = make_corpus(tmp_path / "calib", n_docs=5)
    dst = tmp_path / "pruned"
    rc = main(["prune", str(src_dir), str(dst), "--calib", str(corpus), "--calib-tokens", "256", "--seq-len", "32",
               "--hidden", "32", "--heads", "2", "--intermediate", "64", "--layers", "3", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "layers (most to least important" in err and (dst / "prune_report.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    ours = load(dst).model
    ids = windows(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert hf.config.hidden_size == 32 and hf.config.num_hidden_layers == 3


@pytest.mark.parametrize("args, msg", [
    (["--hidden", "999"], "--hidden 999 is not possible: the source has 64"),
    (["--heads", "3"], "must be a multiple of --kv-heads"),
    (["--hidden", "60", "--heads", "8", "--kv-heads", "2"], "--heads 8 is not possible"),
    (["--hidden", "62"], "does not divide the hidden size 62"),
    (["--drop-layers", "7"], "--drop-layers 7 is not a layer"),
])
def test_bad_targets_fail_before_any_work(src_dir, tmp_path, capsys, args, msg):
    rc = main(["prune", str(src_dir), str(tmp_path / "o"), "--calib", "/nonexistent", *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_validate_rejects_both_layer_options():
    from slimlm.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1)
    with pytest.raises(SlimLMError, match="not both"):
        PruneConfig(layers=1, drop_layers=[0]).validate(cfg)


def test_random_init_keeps_the_shape_not_the_weights(src_dir, tmp_path):
    from tests.data.conftest import make_corpus

    corpus = make_corpus(tmp_path / "calib", n_docs=3)
    common = ["--calib", str(corpus), "--calib-tokens", "64", "--seq-len", "32", "--layers", "2", "--threads", "1"]
    assert main(["prune", str(src_dir), str(tmp_path / "a"), *common]) == 0
    assert main(["prune", str(src_dir), str(tmp_path / "b"), *common, "--random-init"]) == 0
    a, b = load(tmp_path / "a").model, load(tmp_path / "b").model
    assert a.cfg == b.cfg
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
