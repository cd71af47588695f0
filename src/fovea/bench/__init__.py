"""Benchmarks (`fovea bench ...`): each fixes the thread count, warms up, repeats, writes JSON and PNG charts."""
