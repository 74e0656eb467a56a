"""Orders of an epoch's variable-length batches (Dataset Decomposition, Pouransari et al., 2024, Sec. 3.2).

A curriculum gets the epoch's batches grouped by sequence length and returns them in training
order. 'uniform' shuffles them all (buckets sampled in proportion to their tokens); 'grow' is the
paper's short-to-long curriculum, repeated in cycles (their best results cycle it): the epoch is
cut into ``cycles`` rounds, each holding an equal share of every bucket's batches, and each round
goes from the shortest sequences to the longest (shuffled within a length). Every batch of the
epoch is used exactly once either way; only the order differs.

How to add one: a function ``(by_length, rng, cycles) -> list of (length, starts)`` registered with
``@CURRICULA.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slimlm.registry import Registry

Batches = list[tuple[int, np.ndarray]]
Curriculum = Callable[[dict[int, Batches], np.random.Generator, int], Batches]
CURRICULA: Registry[Curriculum] = Registry("curriculum")


@CURRICULA.register("uniform")
def uniform(by_length: dict[int, Batches], rng: np.random.Generator, cycles: int) -> Batches:
    batches = [b for length in sorted(by_length) for b in by_length[length]]
    return [batches[i] for i in rng.permutation(len(batches))]


@CURRICULA.register("grow")
def grow(by_length: dict[int, Batches], rng: np.random.Generator, cycles: int) -> Batches:
    rounds: list[Batches] = [[] for _ in range(cycles)]
    for length in sorted(by_length):  # shortest first within every round
        group = [by_length[length][i] for i in rng.permutation(len(by_length[length]))]
        for c in range(cycles):  # round c gets batches [c * n / C, (c + 1) * n / C)
            rounds[c] += group[c * len(group) // cycles : (c + 1) * len(group) // cycles]
    return [b for r in rounds for b in r]
