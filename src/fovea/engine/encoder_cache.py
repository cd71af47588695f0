"""Encoder features of images already seen, keyed by content, and single-flight encoding: an image that one
request is encoding is waited for by the others, never encoded twice."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch


class EncoderCache:
    """An LRU of ``capacity`` images' encoder features (0: no reuse of any kind, not even between concurrent
    requests). Thread-safe: requests prepare on their own threads, and different images still encode in
    parallel."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.in_flight: dict[str, Future] = {}  # images some request is encoding now
        self.lock = threading.Lock()  # guards both maps; never held while encoding

    def get(self, keys: Sequence[str], compute: Callable[[list[int]], list[torch.Tensor]]
            ) -> tuple[list[torch.Tensor], int]:
        """The value for each key, in order, and how many images were not computed here. ``compute(indices)``
        returns the values of ``keys[i]`` for each index given (the images this call must encode)."""
        found: dict[str, torch.Tensor] = {}
        mine: dict[str, Future] = {}
        waits: dict[str, Future] = {}
        todo: list[int] = []
        with self.lock:
            for i, key in enumerate(keys):
                if key in found or key in mine or key in waits:
                    continue
                if key in self.entries:
                    found[key] = self.entries[key]  # held here: a later eviction cannot take it away
                elif key in self.in_flight and self.capacity > 0:
                    waits[key] = self.in_flight[key]
                else:
                    mine[key] = Future()
                    self.in_flight.setdefault(key, mine[key])
                    todo.append(i)
        if todo:
            try:
                tokens = compute(todo)
            except BaseException as err:
                self._settle(mine, error=err)
                raise
            found.update({keys[i]: t for i, t in zip(todo, tokens, strict=True)})
            self._settle(mine, values=found)
        for key, future in waits.items():
            try:
                found[key] = future.result()
            except BaseException as err:
                raise ValueError(f"encoding this image failed in a concurrent request: {err}") from None
        self._touch(keys)
        return [found[key] for key in keys], len(keys) - len(todo)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def _settle(self, mine: dict[str, Future], values: dict[str, torch.Tensor] | None = None,
                error: BaseException | None = None) -> None:
        with self.lock:
            for key, future in mine.items():
                if error is None:
                    self.entries[key] = values[key]
                    future.set_result(values[key])
                else:
                    future.set_exception(error)
                if self.in_flight.get(key) is future:
                    del self.in_flight[key]

    def _touch(self, keys: Sequence[str]) -> None:
        with self.lock:
            for key in keys:
                if key in self.entries:
                    self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
