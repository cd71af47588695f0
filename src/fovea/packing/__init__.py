"""Packing: many sequences in one stream, bin packing, and the training collator."""

from fovea.packing.batch import IGNORE_INDEX, PackedBatch, Sample, pack
from fovea.packing.binpack import PackingStats, balanced_pack, first_fit_decreasing, packing_stats
from fovea.packing.collate import PackingCollator

__all__ = ["IGNORE_INDEX", "PackedBatch", "PackingCollator", "PackingStats", "Sample", "balanced_pack",
           "first_fit_decreasing", "pack", "packing_stats"]
