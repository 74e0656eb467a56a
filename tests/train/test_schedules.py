"""Every schedule against its formula at chosen updates, and properties over the registry."""

from __future__ import annotations

import math

import pytest

from slimlm.errors import SlimLMError
from slimlm.train.schedules import SCHEDULES, WSD, Constant, Cosine, Horizon, Infinite, Power, Rewarm, decay

H = Horizon(total_steps=100, tokens_per_step=4096, sequences_per_step=8)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-15)


def test_decay_shapes():
    assert decay("linear", 0.25, 0.2) == approx(1 - 0.8 * 0.25)
    assert decay("cosine", 0.5, 0.0) == approx(0.5)
    assert decay("cosine", 1.0, 0.1) == approx(0.1)
    assert decay("exponential", 0.5, 0.01) == approx(0.1)
    assert decay("1-sqrt", 0.25, 0.0) == approx(0.5)
    with pytest.raises(SlimLMError, match="1-sqrt"):
        decay("square", 0.5, 0.0)


def test_constant_and_cosine():
    c = Constant(lr=1e-3, warmup_steps=10)
    assert [c(s, H) for s in (0, 4, 9, 10, 99)] == [approx(1e-4), approx(5e-4), approx(1e-3), 1e-3, 1e-3]
    cos = Cosine(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert cos(9, H) == approx(1e-3)
    # s = 54: p = (54 + 1 - 10) / 90 = 0.5 -> lr (r + (1 - r) / 2)
    assert cos(54, H) == approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert cos(99, H) == approx(1e-4)


def test_wsd_phases_and_branching():
    w = WSD(lr=2e-3, warmup_steps=10, decay_fraction=0.2, decay_shape="linear", min_lr_ratio=0.0)
    assert w(4, H) == approx(1e-3)
    assert all(w(s, H) == 2e-3 for s in range(10, 80))
    assert w(89, H) == approx(2e-3 * (1 - 10 / 20))  # S = 80, p = (89 + 1 - 80) / 20
    assert w(99, H) == approx(0.0)
    sq = WSD(lr=2e-3, warmup_steps=10, decay_fraction=0.2, decay_shape="1-sqrt")
    assert sq(84, H) == approx(2e-3 * (1 - math.sqrt(5 / 20)))
    # branch a decay of 10 updates from the stable checkpoint at update 40: same lr up to 40
    br = WSD(lr=2e-3, warmup_steps=10, decay_start=40, decay_shape="linear")
    hb = H._replace(total_steps=50)
    assert [br(s, hb) for s in range(40)] == [w(s, H) for s in range(40)]
    assert br(44, hb) == approx(2e-3 * (1 - 5 / 10)) and br(49, hb) == approx(0.0)


def test_power_scheduler_formula():
    p = Power(lr=0.02, warmup_steps=5, a=0.5, b=-0.51, decay_fraction=0.1, decay_shape="linear", min_lr_ratio=0.0)

    def lr_p(n):
        return min(0.02, 8 * 0.5 * n**-0.51)  # beta = 8 sequences per update

    assert p(2, H) == approx(3 / 5 * lr_p(5 * 4096))
    assert p(50, H) == approx(lr_p(51 * 4096))
    assert p(50, H) < 0.02  # the power law is below the cap here ...
    assert p(95, H) == approx(lr_p(90 * 4096) * (1 - 6 / 10))  # decay from the value at S = 90
    assert Power(lr=0.02, a=4.0, b=-0.51, batch_unit="tokens")(50, H) == 0.02  # ... the cap with beta in tokens


def test_infinite_schedule_phases():
    inf = Infinite(lr=1e-3, warmup_steps=10, cooldown_steps=20, const_lr_ratio=0.5, anneal_fraction=0.2,
                   anneal_shape="exponential", min_lr_ratio=0.02)
    assert inf(9, H) == approx(1e-3)
    assert inf(19, H) == approx(1e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.5))))  # cool-down midway
    assert all(inf(s, H) == 5e-4 for s in range(30, 80))
    assert inf(89, H) == approx(5e-4 * 0.02**0.5)  # anneal: A = 80, p = 0.5
    assert inf(99, H) == approx(5e-4 * 0.02)
    later = Infinite(lr=1e-3, warmup_steps=10, cooldown_steps=20, anneal_start=60)  # anneal another checkpoint
    assert later(59, H) == 5e-4 and later(60, H) < 5e-4


def test_rewarm_from_previous_final_lr():
    r = Rewarm(lr=1e-3, warmup_steps=10, start_lr=1e-4, min_lr_ratio=0.1)
    assert r(0, H) == approx(1e-4 + 9e-4 * 0.1)
    assert r(9, H) == approx(1e-3)
    assert r(54, H) == approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert r(99, H) == approx(1e-4)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_is_pure_positive_and_bounded(name):
    cls = SCHEDULES.get(name)
    s = cls(lr=1e-3, warmup_steps=5)
    lrs = [s(i, H) for i in range(H.total_steps)]
    assert all(0 <= x <= 1e-3 * (1 + 1e-12) and math.isfinite(x) for x in lrs)
    assert lrs[0] < lrs[5] or name == "power"  # warm-up starts low
    assert lrs == [s(i, H) for i in range(H.total_steps)]  # a function of the step only
    with pytest.raises(SlimLMError):
        cls(lr=-1.0)


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(SlimLMError, match="constant, cosine, infinite, power, rewarm, wsd"):
        SCHEDULES.get("linear-ish")
    with pytest.raises(SlimLMError, match="min_lr_ratio"):
        WSD(decay_shape="exponential", min_lr_ratio=0.0)
