"""Routing policies for serving replicas (pure bookkeeping, no Ray)."""

from __future__ import annotations

import pytest

from slimlm.cluster.routing import ROUTERS, PrefixAffinityRouter, prefix_keys


def prompt(group: int, user: int, n: int = 80) -> list[int]:
    return [1000 + group] * 48 + [user] * (n - 48)  # 3 blocks of 16 shared per group


@pytest.mark.parametrize("name", ROUTERS.names())
def test_every_router_uses_only_live_replicas_and_tracks_load(name):
    r = ROUTERS.get(name)(3)
    seen = set()
    for i in range(12):
        c = r.choose(prefix_keys(prompt(i % 4, i), 16, 8), alive=[True, False, True])
        assert c.replica in (0, 2)
        r.started(c.replica)
        seen.add(c.replica)
    assert seen == {0, 2} and sum(r.load) == 12
    for rep in (0, 2):
        while r.load[rep]:
            r.finished(rep)
    with pytest.raises(RuntimeError):
        r.choose([], alive=[False, False, False])


def test_keys_are_a_chain_of_full_blocks_and_salted():
    a = prefix_keys(list(range(40)), 16, 8)
    assert len(a) == 2  # 40 tokens: two full blocks
    assert prefix_keys(list(range(16)) + [7] * 16, 16, 8)[0] == a[0]  # same first block, same first key
    assert prefix_keys(list(range(16)) + [7] * 16, 16, 8)[1] != a[1]
    assert prefix_keys(list(range(40)), 16, 1) == a[:1]
    assert prefix_keys(list(range(40)), 16, 8, salt="tenant") != a
    assert prefix_keys(list(range(10)), 16, 8) == []


def test_shared_prefixes_stick_to_one_replica_and_groups_spread():
    r = PrefixAffinityRouter(2, max_imbalance=100)
    where = {}
    for i in range(40):
        g = i % 4
        c = r.choose(prefix_keys(prompt(g, i), 16, 8))
        assert where.setdefault(g, c.replica) == c.replica
        assert c.matched_blocks == (3 if i >= 4 else 0)
    assert set(where.values()) == {0, 1}  # the 4 groups do not all land on one replica


def test_imbalance_bound_overrides_affinity():
    r = PrefixAffinityRouter(2, max_imbalance=2)
    first = r.choose(prefix_keys(prompt(0, 0), 16, 8)).replica
    r.started(first)
    picks = []
    for i in range(1, 8):  # every request shares group 0's prefix and none finishes
        c = r.choose(prefix_keys(prompt(0, i), 16, 8))
        r.started(c.replica)
        picks.append(c.replica)
        assert abs(r.load[0] - r.load[1]) <= 2 + 1
    assert 1 - first in picks  # overflow went to the other replica


def test_a_dead_owner_is_routed_around():
    r = PrefixAffinityRouter(2)
    owner = r.choose(prefix_keys(prompt(0, 0), 16, 8)).replica
    alive = [True, True]
    alive[owner] = False
    c = r.choose(prefix_keys(prompt(0, 1), 16, 8), alive)
    assert c.replica != owner and c.matched_blocks == 0
    alive[owner] = True  # back (replaced): the prefix now lives on the one that took it
    assert r.choose(prefix_keys(prompt(0, 2), 16, 8), alive).replica == c.replica


def test_bad_settings():
    with pytest.raises(ValueError):
        PrefixAffinityRouter(0)
    with pytest.raises(ValueError):
        PrefixAffinityRouter(2, max_imbalance=-1)


def test_prefix_routing_keeps_the_hit_rate_of_one_engine(tiny_llama_dir):
    """The measurement behind docs/deployment.md, on the tiny model and token-id prompts."""
    import random

    from slimlm.cluster.routing_bench import hit_rate
    from slimlm.model.hub import load

    lm = load(tiny_llama_dir)
    prompts = [[10 + g] * 64 + [100 + q, 200 + g] for g in range(4) for q in range(6)]
    random.Random(0).shuffle(prompts)
    got = {p: hit_rate(lm, {}, prompts, 2, p, wave=4) for p in (None, "round_robin", "prefix")}
    one, rr, px = (got[p]["hit_rate"] for p in (None, "round_robin", "prefix"))
    assert got["prefix"]["prompt_tokens"] == got["round_robin"]["prompt_tokens"] == 24 * 66
    assert px > rr and px == pytest.approx(one)  # 4 groups x 4 full blocks, each computed once
    assert got["prefix"]["cached_tokens"] == (24 - 4) * 64
    assert sum(got["prefix"]["requests_per_replica"]) == 24 and min(got["prefix"]["requests_per_replica"]) > 0
