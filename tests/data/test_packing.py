"""Packing with document masks, concat-and-chunk, the packed loader and the variable-length sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimlm.data.loader import PackedLoader
from slimlm.data.packing import IGNORE, pack_row, positions_from_segments
from slimlm.data.tokens import TokenDataset
from slimlm.data.varlen import VariableLengthSampler, decompose
from slimlm.train.presets import model_config, new_model


def test_pack_row_restarts_positions_and_masks_cross_document_targets():
    tokens = np.array([5, 6, 7, 0, 8, 9, 0, 3, 4])
    docs = np.array([4, 4, 4, 4, 9, 9, 9, 2, 2])
    inp, lab, pos, seg = pack_row(tokens, docs, "document")
    assert inp.tolist() == [5, 6, 7, 0, 8, 9, 0, 3]
    assert lab.tolist() == [6, 7, 0, IGNORE, 9, 0, IGNORE, 4]
    assert pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert seg.tolist() == [0, 0, 0, 0, 5, 5, 5, -2]
    inp, lab, pos, seg = pack_row(tokens, docs, "concat")
    assert lab.tolist() == tokens[1:].tolist() and pos.tolist() == list(range(8)) and seg is None
    assert positions_from_segments(np.array([1, 1, 2, 2, 2, 1])).tolist() == [0, 1, 0, 1, 2, 0]


def test_document_masking_gives_each_document_its_own_loss(prepared):
    """A packed row's per-token losses equal those of running each document piece alone."""
    torch.manual_seed(0)
    ds = TokenDataset(prepared)
    model = new_model(model_config("micro", 384), seed=1).eval()
    loader = PackedLoader([ds], seq_len=256, micro_batch=2, packing="document")
    b = next(b for b in (loader.next_batch() for _ in range(10)) if int(b.segment_ids[:, -1].min()) > 0)
    with torch.no_grad():
        logits = model(b.input_ids, b.position_ids, segment_ids=b.segment_ids)  # (B, T, V)
        packed = F.cross_entropy(logits.transpose(1, 2), b.labels, ignore_index=IGNORE, reduction="none")
        pieces = 0
        for r in range(b.input_ids.shape[0]):
            for s in b.segment_ids[r].unique():
                idx = (b.segment_ids[r] == s).nonzero().flatten()
                alone = model(b.input_ids[r, idx][None])  # positions 0.. by default
                loss = F.cross_entropy(alone[0], b.labels[r, idx], ignore_index=IGNORE, reduction="none")
                torch.testing.assert_close(packed[r, idx], loss, atol=2e-5, rtol=1e-5)
                pieces += 1
        assert pieces > 2
        # the classic layout (attention across documents) does not give the same losses
        mixed = model(b.input_ids)
        other = F.cross_entropy(mixed.transpose(1, 2), b.labels, ignore_index=IGNORE, reduction="none")
        assert (other - packed).abs().max() > 1e-3


def test_loader_shards_by_rank_and_resumes(prepared):
    ds = TokenDataset(prepared)
    one = PackedLoader([ds], 64, 4, world=1)
    ranks = [PackedLoader([ds], 64, 2, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        full = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(full.input_ids, torch.cat([p.input_ids for p in parts]))
        assert torch.equal(full.labels, torch.cat([p.labels for p in parts]))
        assert full.real_tokens == full.computed_tokens  # packed: no padding at all
    state = one.state_dict()
    expect = [one.next_batch().input_ids for _ in range(3)]
    again = PackedLoader([ds], 64, 4)
    again.load_state_dict(state)
    assert all(torch.equal(e, again.next_batch().input_ids) for e in expect)


def test_loader_covers_an_epoch_then_reshuffles(prepared):
    ds = TokenDataset(prepared)
    plain = PackedLoader([ds], 32, 1, shuffle=False)
    n = plain.streams[0].rows_per_epoch
    stream = np.concatenate([plain.next_batch().input_ids[0].numpy() for _ in range(n)])
    assert np.array_equal(stream, np.asarray(ds.tokens[: n * 32]))  # the stream, in order, once
    loader = PackedLoader([ds], 32, 1)
    epoch0 = np.concatenate([loader.next_batch().input_ids[0].numpy() for _ in range(n)])
    left = np.bincount(np.asarray(ds.tokens), minlength=400) - np.bincount(epoch0, minlength=400)
    assert left.min() >= 0 and left.sum() == ds.n_tokens - n * 32  # every token once, but the tail
    assert not np.array_equal(epoch0, stream)  # shuffled documents
    epoch1 = np.concatenate([loader.next_batch().input_ids[0].numpy() for _ in range(n)])
    assert not np.array_equal(epoch1, epoch0)  # a new document order each epoch


def test_mixture_weights_and_replay(prepared):
    ds = TokenDataset(prepared)
    loader = PackedLoader([ds, ds], 32, 4, weights=[0.75, 0.25])
    for _ in range(100):
        loader.next_batch()
    assert loader.cursors[0] + loader.cursors[1] == 400
    assert abs(loader.cursors[1] / 400 - 0.25) < 0.01


def test_decompose_is_the_binary_expansion():
    assert decompose(1000, 1024, 8) == [512, 256, 128, 64, 32, 8]
    assert decompose(2100, 1024, 32) == [1024, 1024, 32]
    assert decompose(20, 1024, 32) == []


def test_variable_length_batches_come_from_single_documents(prepared):
    ds = TokenDataset(prepared)
    s = VariableLengthSampler(ds, batch_tokens=256, max_len=128, min_len=16, seed=3)
    assert set(s.buckets) <= {16, 32, 64, 128} and len(s.buckets) >= 3
    assert 0.5 < s.kept_fraction <= 1.0
    seen_lengths = set()
    for i in range(sum(s.batches_per_epoch.values())):
        b = s.next_batch()
        B, T = b.input_ids.shape
        assert B * T == 256 and T in s.buckets
        seen_lengths.add(T)
        assert torch.equal(b.position_ids[0], torch.arange(T))
        for row, lab in zip(b.input_ids.numpy()[: 2 if i < 20 else 0], b.labels.numpy()):
            # the row and its targets lie inside one document
            hits = [d for d in range(ds.n_docs) if _contains(ds.doc(d), np.r_[row, lab[-1]])]
            assert hits, "a sequence crosses a document boundary"
    assert seen_lengths == {k for k, n in s.batches_per_epoch.items() if n}  # every bucket, one epoch
    two = [VariableLengthSampler(ds, 256, 128, 16, rank=r, world=2, seed=3) for r in range(2)]
    b1, parts = VariableLengthSampler(ds, 256, 128, 16, seed=3).next_batch(), [t.next_batch() for t in two]
    assert torch.equal(b1.input_ids, torch.cat([p.input_ids for p in parts]))


def _contains(doc: np.ndarray, seq: np.ndarray) -> bool:
    n = len(seq)
    win = np.lib.stride_tricks.sliding_window_view(doc, n) if len(doc) >= n else np.zeros((0, n))
    return bool((win == seq).all(axis=1).any())


def test_variable_length_sampler_rejects_bad_lengths(prepared):
    from slimlm.errors import SlimLMError

    with pytest.raises(SlimLMError, match="power of two"):
        VariableLengthSampler(TokenDataset(prepared), 256, 100)
