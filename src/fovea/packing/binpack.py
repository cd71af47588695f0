"""Bin packing of sequence lengths into streams of a fixed token capacity."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


def _check(lengths: Sequence[int], capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 token, got {capacity}")
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than the capacity of {capacity} tokens per stream")
        if n < 1:
            raise ValueError(f"sequence {i} is empty")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices per bin: longest first, each into the first bin with room. At most 11/9 OPT + 6/9 bins."""
    _check(lengths, capacity)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def balanced_pack(lengths: Sequence[int], capacity: int, num_streams: int, *, seed: int = 0) -> list[list[list[int]]]:
    """Multipack's balanced variant: steps of ``num_streams`` bins (one per rank), each step filled longest-first
    into the least-loaded stream with room, so ranks in a step do nearly equal work. Step order is shuffled with
    ``seed``. Returns steps -> streams -> indices."""
    _check(lengths, capacity)
    if num_streams < 1:
        raise ValueError(f"num_streams must be at least 1, got {num_streams}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # ties in length fall in a seeded order
    remaining = sorted(order, key=lambda i: -lengths[i])
    steps: list[list[list[int]]] = []
    while remaining:
        streams: list[list[int]] = [[] for _ in range(num_streams)]
        loads = [0] * num_streams
        leftover = []
        for i in remaining:
            fits = [s for s in range(num_streams) if loads[s] + lengths[i] <= capacity]
            if fits:
                target = min(fits, key=lambda s: loads[s])
                streams[target].append(i)
                loads[target] += lengths[i]
            else:
                leftover.append(i)
        steps.append(streams)
        remaining = leftover
    rng.shuffle(steps)
    return steps


@dataclass
class PackingStats:
    sequences: int  # sequences packed
    bins: int  # streams used
    real_tokens: int  # tokens that belong to a sequence
    capacity_tokens: int  # bins * capacity
    efficiency: float  # real_tokens / capacity_tokens
    padded_tokens: int  # tokens a padded batch of the same bins would compute (bins * longest sequence per bin)


def packing_stats(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> PackingStats:
    real = sum(lengths[i] for b in bins for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in bins if b)
    used = sum(1 for b in bins if b)
    return PackingStats(len([i for b in bins for i in b]), used, real, used * capacity,
                        real / max(1, used * capacity), padded)
