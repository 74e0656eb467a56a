"""Which replica gets a request: routing policies by name (``--routing``).

``prefix`` (default) keeps prefix caching working across replicas. A prompt's first full KV
blocks are hashed as a chain (key j covers blocks 1..j, as the engine's prefix cache keys them;
a cache salt or an isolated API key seeds the chain, so requests that may not share KV never
match). The replica that last took the deepest matching key gets the request, unless it has more
than ``max_imbalance`` requests in flight above the least-loaded live replica; then, as for a
prompt nobody has seen, the least-loaded one takes it (ties split by the first block's hash, so
new prefix groups spread evenly). Routers keep only bookkeeping, no I/O: the ingress calls
``choose``, ``started`` and ``finished``.

How to add a policy: subclass :class:`Router`, override ``pick``, register with
``@ROUTERS.register("name")``; ``tests/serve/test_routing.py`` runs every registered policy.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from slimlm.registry import Registry

ROUTERS: Registry[type[Router]] = Registry("routing policy")


def prefix_keys(ids: Sequence[int], block_size: int, max_blocks: int, salt: str | None = None) -> list[bytes]:
    """Chain hashes of the first ``max_blocks`` full blocks of ``ids``: key j covers blocks 1..j."""
    h = hashlib.sha256((salt or "").encode()).digest()
    keys = []
    for j in range(min(len(ids) // block_size, max_blocks)):
        block = array("q", ids[j * block_size:(j + 1) * block_size]).tobytes()
        h = hashlib.sha256(h + block).digest()
        keys.append(h)
    return keys


class Choice(NamedTuple):
    replica: int
    matched_blocks: int  # prefix blocks the chosen replica was last sent (0: routed by load)


class Router:
    def __init__(self, num_replicas: int, max_imbalance: int = 4, capacity: int = 100_000):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance}")
        self.n, self.max_imbalance, self.capacity = num_replicas, max_imbalance, capacity
        self.load = [0] * num_replicas  # requests in flight per replica

    def choose(self, keys: list[bytes], alive: Sequence[bool] | None = None) -> Choice:
        """A live replica for a request whose prefix keys are ``keys`` (call ``started`` with it)."""
        live = [i for i in range(self.n) if alive is None or alive[i]]
        if not live:
            raise RuntimeError("no live replica")
        return self.pick(keys, live)

    def pick(self, keys: list[bytes], live: list[int]) -> Choice:
        raise NotImplementedError

    def least_loaded(self, live: list[int], tie: int) -> int:
        low = min(self.load[i] for i in live)
        ties = [i for i in live if self.load[i] == low]
        return ties[tie % len(ties)]

    def started(self, replica: int) -> None:
        self.load[replica] += 1

    def finished(self, replica: int) -> None:
        self.load[replica] = max(0, self.load[replica] - 1)


@ROUTERS.register("prefix")
class PrefixAffinityRouter(Router):
    def __init__(self, num_replicas: int, max_imbalance: int = 4, capacity: int = 100_000):
        super().__init__(num_replicas, max_imbalance, capacity)
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # prefix key -> replica last sent it (LRU)

    def pick(self, keys: list[bytes], live: list[int]) -> Choice:
        matched, target = 0, None
        for depth, k in enumerate(keys, 1):
            r = self.owner.get(k)
            if r is None:
                break  # deeper keys extend this one: none of them can be known
            if r in live:
                matched, target = depth, r
        low = min(self.load[i] for i in live)
        if target is None or self.load[target] - low > self.max_imbalance:
            tie = int.from_bytes(keys[0][:4], "little") if keys else sum(self.load)
            target, matched = self.least_loaded(live, tie), 0
        for k in keys:
            self.owner[k] = target
            self.owner.move_to_end(k)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)
        return Choice(target, matched)


@ROUTERS.register("round_robin")
class RoundRobinRouter(Router):
    def __init__(self, num_replicas: int, max_imbalance: int = 4, capacity: int = 100_000):
        super().__init__(num_replicas, max_imbalance, capacity)
        self.next = 0

    def pick(self, keys: list[bytes], live: list[int]) -> Choice:
        for _ in range(self.n):
            r, self.next = self.next, (self.next + 1) % self.n
            if r in live:
                return Choice(r, 0)
        return Choice(live[0], 0)
