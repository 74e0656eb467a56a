"""Dataset Decomposition's length curriculum: same batches as uniform, short to long per cycle."""

from __future__ import annotations

import pytest

from slimlm.data.tokens import TokenDataset
from slimlm.data.varlen import VariableLengthSampler
from slimlm.errors import SlimLMError
from slimlm.train.config import load_config


def lengths(s: VariableLengthSampler, n: int) -> list[int]:
    return [s.next_batch().input_ids.shape[1] for _ in range(n)]


@pytest.mark.parametrize("cycles", [1, 2])
def test_grow_goes_short_to_long_in_each_cycle_over_the_same_batches(prepared, cycles):
    ds = TokenDataset(prepared, "train")
    uni = VariableLengthSampler(ds, 256, 64, 8, seed=3)
    grow = VariableLengthSampler(ds, 256, 64, 8, seed=3, curriculum="grow", cycles=cycles)
    n = sum(grow.batches_per_epoch.values())
    order = grow.batch_order(0)
    assert sorted((L, tuple(s)) for L, s in order) == sorted((L, tuple(s)) for L, s in uni.batch_order(0))
    ls = lengths(grow, n)
    assert len(set(ls)) >= 3  # several buckets
    drops = sum(1 for a, b in zip(ls, ls[1:]) if b < a)
    assert drops == cycles - 1  # non-decreasing within a round, back to short at each new round
    assert lengths(uni, n) != ls  # the uniform order mixes lengths


def test_resume_continues_the_curriculum(prepared):
    ds = TokenDataset(prepared, "train")
    a = VariableLengthSampler(ds, 256, 64, 8, curriculum="grow", cycles=2)
    first = lengths(a, 5)
    b = VariableLengthSampler(ds, 256, 64, 8, curriculum="grow", cycles=2)
    b.load_state_dict(a.state_dict())
    assert lengths(b, 7) == lengths(a, 7) and first
    assert 0 < a.attention_cost < 1  # shorter rows than max_len for part of the data


def test_bad_curriculum_settings():
    with pytest.raises(SlimLMError, match="unknown curriculum 'zigzag'; known: grow, uniform"):
        load_config(None, ["--data.packing", "varlen", "--data.curriculum", "zigzag"])
    with pytest.raises(SlimLMError, match="needs data.packing = 'varlen'"):
        load_config(None, ["--data.curriculum", "grow"])
