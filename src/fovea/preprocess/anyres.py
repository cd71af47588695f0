"""LLaVA-NeXT AnyRes: pick the grid resolution that keeps the most of an image, and count its tiles."""

from __future__ import annotations


def select_best_resolution(size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """Among ``pinpoints`` (h, w), the one whose aspect-preserving fit of ``size`` keeps the most effective pixels,
    ties broken by the least wasted area (LLaVA-NeXT's rule)."""
    if not pinpoints:
        raise ValueError("AnyRes needs at least one pinpoint resolution")
    height, width = size
    best, best_effective, best_waste = None, -1, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        dw, dh = int(width * scale), int(height * scale)
        effective = min(dw * dh, width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def num_tiles(size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...], tile: int) -> int:
    """Crops an image of ``size`` is cut into, not counting the thumbnail."""
    ph, pw = select_best_resolution(size, pinpoints)
    return (ph // tile) * (pw // tile)


def grid_pinpoints(tile: int, max_grid: int) -> tuple[tuple[int, int], ...]:
    """All (rows*tile, cols*tile) with rows, cols <= ``max_grid``: the wide AnyRes search used for 4K pages."""
    return tuple((r * tile, c * tile) for r in range(1, max_grid + 1) for c in range(1, max_grid + 1))
