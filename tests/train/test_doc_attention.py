"""Document-masked attention without a dense mask (train/doc_attention.py) equals the dense path."""

from __future__ import annotations

import pytest
import torch

from slimlm.model.attention import DenseAttention
from slimlm.train.doc_attention import FlexAttention, VarlenAttention, document_spans, install
from slimlm.train.presets import model_config, new_model
from tests.train.helpers import tiny_config


def packed(B=3, T=24, seed=0):
    """Rows of several documents: segment ids (contiguous runs) and positions restarting per document."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for c in torch.randint(1, T, (b + 1,), generator=g).tolist():
            seg[b, c:] += 1
    pos = torch.zeros_like(seg)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    return pos, seg


def test_document_spans_cover_every_token_once():
    pos, seg = packed()
    spans = document_spans(seg)
    flat = torch.cat([i.flatten() for i in spans.values()]).sort().values
    assert torch.equal(flat, torch.arange(seg.numel()))
    for L, idx in spans.items():
        assert idx.shape[1] == L and bool((seg.flatten()[idx] == seg.flatten()[idx[:, :1]]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention_equals_the_dense_mask(dtype):
    pos, seg = packed()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 24, 8, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(3, 2, 24, 8, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    outs, grads = [], []
    for cls in (DenseAttention, VarlenAttention):
        o = cls(pos, seg, 0.3, {}).attend(0, q, k, v)
        (o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
        outs.append(o.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, **tol)


def test_varlen_attention_under_bf16_autocast_equals_the_dense_mask():
    """fp32 q/k/v with bf16 autocast (the trainer's mixed precision): attention returns bf16, and
    the per-document pieces are gathered in that dtype (this failed with a dtype mismatch)."""
    pos, seg = packed(seed=2)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 24, 8, generator=g)
    k, v = (torch.randn(3, 2, 24, 8, generator=g) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = DenseAttention(pos, seg, 0.3, {}).attend(0, q, k, v)
        varlen = VarlenAttention(pos, seg, 0.3, {}).attend(0, q, k, v)
    assert varlen.dtype == dense.dtype
    torch.testing.assert_close(varlen.float(), dense.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_equals_the_dense_mask_forward():
    pos, seg = packed(T=32)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 32, 8, generator=g)
    k, v = (torch.randn(3, 2, 32, 8, generator=g) for _ in range(2))
    with torch.no_grad():
        want = DenseAttention(pos, seg, 0.3, {}).attend(0, q, k, v)
        got = FlexAttention(pos, seg, 0.3, {}).attend(0, q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_installed_varlen_model_gives_the_dense_loss_and_gradients():
    pos, seg = packed(B=2, T=20)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    res = []
    for kind in ("dense", "varlen"):
        m = new_model(model_config("micro", 96), seed=0)
        install(m, kind)
        loss = m(ids, pos, segment_ids=seg).float().logsumexp(-1).mean()
        loss.backward()
        res.append((loss.detach(), m.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(res[1][0], res[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res[1][1], res[0][1], atol=1e-6, rtol=1e-5)


def test_training_with_varlen_attention_takes_the_dense_updates(prepared, tmp_path):
    from slimlm.train.trainer import Trainer

    losses = {}
    for kind in ("dense", "varlen"):
        t = Trainer(tiny_config(prepared, tmp_path / kind, "--train.attention", kind, "--train.steps", "4"))
        try:
            losses[kind] = [t.update().loss for _ in range(4)]
        finally:
            t.close()
    assert losses["varlen"] == pytest.approx(losses["dense"], rel=1e-5)


def test_flex_training_on_cpu_is_a_one_line_error(prepared, tmp_path, capsys):
    from tests.train.test_cli import one_line_error
    from tests.train.helpers import tiny_args

    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nsteps = 2\n')
    base = ["train", str(cfg), *tiny_args(prepared, tmp_path / "f", "--train.device", "cpu")]
    one_line_error(capsys, [*base, "--train.attention", "flex"], "train.attention 'flex' needs CUDA")
    one_line_error(capsys, [*base, "--train.attention", "sparse"], "train.attention must be dense, varlen or flex")
