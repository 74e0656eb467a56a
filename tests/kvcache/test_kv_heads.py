"""KV-head compression (slimlm compress-kv): lossless when a group's heads are duplicates (the
projections and the RoPE-commuting key transform are exact), the written GQA checkpoint loads in
transformers with the same logits as slimlm, a real compression keeps most activation energy, and
bad head counts are one-line errors."""

from __future__ import annotations

import pytest
import torch

from slimlm.cli import main
from slimlm.errors import SlimLMError
from slimlm.kvcache.kv_heads import check_kv_heads, compress_kv_heads
from tests.conftest import make_hf_model

IDS = torch.tensor([[3 + (11 * i) % 300 for i in range(48)]])


def _load(path):
    from slimlm.model.hub import load

    return load(str(path)).model.float().eval()


def _duplicate_kv_heads(model):
    """Make KV head 1 a copy of KV head 0 in every layer (keys and values, biases too)."""
    d = model.cfg.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight[d : 2 * d] = lin.weight[:d]
                if lin.bias is not None:
                    lin.bias[d : 2 * d] = lin.bias[:d]


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_duplicate_heads_compress_losslessly(tmp_path, kind, weighted):
    make_hf_model(tmp_path / "m", kind)
    model = _load(tmp_path / "m")
    _duplicate_kv_heads(model)
    with torch.no_grad():
        ref = model(IDS)
        windows = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
        stats = compress_kv_heads(model, windows, 1, weighted=weighted)
        out = model(IDS)
    assert model.cfg.num_kv_heads == 1 and model.model.layers[0].self_attn.k_proj.out_features == model.cfg.head_dim
    assert all(s["keys"] > 1 - 1e-9 and s["values"] > 1 - 1e-9 and s["error"] < 1e-5 for s in stats)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cli_writes_a_gqa_checkpoint_transformers_loads(tmp_path, capsys):
    import transformers

    make_hf_model(tmp_path / "m", "llama", num_attention_heads=4, num_key_value_heads=4)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Small language models are fast. " * 60)
    assert main(["compress-kv", str(tmp_path / "m"), str(tmp_path / "out"), "--kv-heads", "2", "--calib", str(calib),
                 "--calib-tokens", "512", "--seq-len", "64", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "KV heads 4 -> 2" in err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == 2
    ours = _load(tmp_path / "out")
    assert ours.cfg.num_kv_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, rtol=1e-4, atol=1e-4)
    # random heads are not low rank: some energy is lost, most is kept
    import re

    k, v = (float(x) for x in re.search(r"keys ([0-9.]+), values ([0-9.]+)", err).groups())
    assert 0.3 < k < 1.0 and 0.3 < v < 1.0, err


@pytest.mark.parametrize("heads,msg", [(3, "does not divide the model's 4 query heads"),
                                       (2, "is not fewer than"), (0, "positive integer")])
def test_bad_head_counts_are_one_line(tmp_path, heads, msg, capsys):
    make_hf_model(tmp_path / "m", "llama")  # 4 query heads, 2 KV heads
    with pytest.raises(SlimLMError, match=msg):
        check_kv_heads(_load(tmp_path / "m").cfg, heads)
    assert main(["compress-kv", str(tmp_path / "m"), str(tmp_path / "o"), "--kv-heads", str(heads)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if e.startswith("error:")]) == 1 and msg in err[-1]


def _loud_but_unread_head(model):
    """KV head 1 of every layer: keys and values 10x louder, but its query heads' q rows and the
    o_proj columns that read its values 100x quieter, so it matters least to the output while
    holding most of the plain activation energy."""
    d, r = model.cfg.head_dim, model.cfg.num_heads // model.cfg.num_kv_heads
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            a.k_proj.weight[d : 2 * d] *= 10
            a.v_proj.weight[d : 2 * d] *= 10
            a.q_proj.weight[r * d : 2 * r * d] *= 0.01
            a.o_proj.weight[:, r * d : 2 * r * d] *= 0.01


def test_weighting_by_the_readers_beats_plain_pca(tmp_path):
    """Keys weighted by the query energy that scores them, values by the o_proj columns that read
    them: on a model whose loudest KV head is read least, the attention output error (each layer fed
    the original inputs) is far below plain PCA's, and the logits are closer to the original's."""
    make_hf_model(tmp_path / "m", "llama")
    windows = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    errs, logit_errs = {}, {}
    for weighted in (True, False):
        model = _load(tmp_path / "m")
        _loud_but_unread_head(model)
        with torch.no_grad():
            ref = model(IDS)
            stats = compress_kv_heads(model, windows, 1, weighted=weighted)
            logit_errs[weighted] = float((model(IDS) - ref).norm() / ref.norm())
        errs[weighted] = sum(s["error"] for s in stats) / len(stats)
    assert errs[True] < 0.5 * errs[False], errs
    assert logit_errs[True] < logit_errs[False], logit_errs
