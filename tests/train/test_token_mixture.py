"""Token-prediction mixtures (TokenUnify): each term against a brute-force loop; bad weights."""

from __future__ import annotations

import pytest
import torch

from slimlm.data.packing import IGNORE, Batch
from slimlm.errors import SlimLMError
from slimlm.train.config import ObjectiveConfig
from slimlm.train.presets import model_config, new_model
from slimlm.train.token_mixture import mixture_loss_sum
from slimlm.train.trainer import loss_sum
from tests.train.helpers import losses_after_kill_and_resume


def packed_batch() -> Batch:
    """One row holding two documents (segments 0 and 1), the last target of each ignored."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    labels = torch.tensor([[6, 7, 8, IGNORE, 10, 11, 12, IGNORE]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    return Batch(ids, labels, pos, seg, 8)


def brute_force(logp: torch.Tensor, b: Batch, k: int) -> tuple[float, int]:
    """Sum of -log p_t(x_{t+k}) over positions whose t+k is inside t's document, and how many."""
    s, n = 0.0, 0
    ids, seg = b.input_ids[0], b.segment_ids[0]
    for t in range(ids.shape[0]):
        j = t + k
        if b.labels[0, t] != IGNORE and j < ids.shape[0] and seg[j] == seg[t]:
            s -= float(logp[0, t, ids[j]])
            n += 1
    return s, n


def test_each_term_equals_a_brute_force_loop():
    model = new_model(model_config("micro", 64), init_std=0.1)
    b = packed_batch()
    with torch.no_grad():
        logp = model(b.input_ids, b.position_ids, segment_ids=b.segment_ids).float().log_softmax(-1)
        assert float(mixture_loss_sum(model, b, 1, 0, 0, 4)) == pytest.approx(float(loss_sum(model, b)), rel=1e-6)
        assert float(mixture_loss_sum(model, b, 1, 0, 0, 4)) == pytest.approx(brute_force(logp, b, 1)[0], rel=1e-6)
        want = 0.0  # next-all over horizon 2: per position, the mean over its valid offsets
        for t in range(8):
            terms = []
            for k in (1, 2):
                j = t + k
                if b.labels[0, t] != IGNORE and j < 8 and b.segment_ids[0, j] == b.segment_ids[0, t]:
                    terms.append(-float(logp[0, t, b.input_ids[0, j]]))
            want += sum(terms) / len(terms) if terms else 0.0
        assert float(mixture_loss_sum(model, b, 0, 1, 0, 2)) == pytest.approx(want, rel=1e-6)
        g = torch.Generator().manual_seed(0)
        k = int(torch.randint(2, 5, (1,), generator=torch.Generator().manual_seed(0)))
        got = float(mixture_loss_sum(model, b, 0, 0, 1, 4, g))
        assert got == pytest.approx(brute_force(logp, b, k)[0], rel=1e-6)
        mixed = float(mixture_loss_sum(model, b, 3, 1, 0, 2))
        assert mixed == pytest.approx((3 * brute_force(logp, b, 1)[0] + want) / 4, rel=1e-6)


def test_bad_weights_are_one_line_errors():
    with pytest.raises(SlimLMError, match="must be >= 0 and sum to a positive value"):
        ObjectiveConfig(next_token=0, next_all=0, random_position=0)
    with pytest.raises(SlimLMError, match="must be >= 0"):
        ObjectiveConfig(next_all=-1)


def test_mixture_trains_and_resumes_step_exactly(prepared, tmp_path):
    extra = ("--objective.next_all", "0.5", "--objective.random_position", "0.5", "--objective.horizon", "3")

    curve = losses_after_kill_and_resume(prepared, tmp_path, *extra)
    ref = [curve["ref"][k] for k in sorted(curve["ref"])]
    assert curve["cut"] == curve["ref"] and ref[-1] < ref[0]
