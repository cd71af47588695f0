"""Training collator: a dataset of samples -> packed batches, via the balanced bin packer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fovea.packing.batch import PackedBatch, Sample, pack
from fovea.packing.binpack import balanced_pack, packing_stats


class PackingCollator:
    """Yields this rank's ``PackedBatch`` for every step of an epoch. Each step packs up to ``capacity`` tokens per
    stream, ``num_streams`` streams (one per rank) balanced in total tokens; the same ``seed`` and ``epoch`` give
    the same batches on every rank."""

    def __init__(self, *, capacity: int, image_token_id: int | None = None, num_streams: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if not 0 <= rank < num_streams:
            raise ValueError(f"rank {rank} is outside 0..{num_streams - 1}")
        self.capacity, self.image_token_id = capacity, image_token_id
        self.num_streams, self.rank, self.seed = num_streams, rank, seed
        self.last_efficiency = 0.0

    def plan(self, lengths: Sequence[int], epoch: int = 0) -> list[list[list[int]]]:
        """Steps -> streams -> sample indices for an epoch."""
        steps = balanced_pack(lengths, self.capacity, self.num_streams, seed=self.seed + epoch)
        bins = [stream for step in steps for stream in step]
        self.last_efficiency = packing_stats(lengths, bins, self.capacity).efficiency
        return steps

    def batches(self, dataset: Sequence[Sample], epoch: int = 0, lengths: Sequence[int] | None = None,
                start_step: int = 0) -> Iterator[PackedBatch]:
        """This rank's batches from ``start_step`` on (to resume mid-epoch). ``lengths`` spares loading every
        sample to measure it."""
        lengths = list(lengths) if lengths is not None else [len(dataset[i]) for i in range(len(dataset))]
        for step in self.plan(lengths, epoch)[start_step:]:
            indices = step[self.rank]
            if indices:
                yield pack([dataset[i] for i in indices], image_token_id=self.image_token_id, capacity=self.capacity)
