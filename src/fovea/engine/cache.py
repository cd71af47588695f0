"""A slot KV cache that attention reads in place, and the per-step plan that says where each token goes.

Each request owns a slot of ``max_len`` positions in every layer. Storage per layer is (K, slots*max_len, d), so a
sequence's keys are one contiguous slice [slot*max_len, slot*max_len + length): the varlen backends attend to that
slice directly, nothing is gathered or padded.

Notation: K key/value heads, d head width, T tokens in the step's packed stream, H query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fovea.attention.backends import ranges_attention


@dataclass
class StepPlan:
    write_index: torch.Tensor  # (T,) flat storage position of every stream token
    q_ranges: list[tuple[int, int]]  # stream slice of each sequence's new tokens
    k_ranges: list[tuple[int, int]]  # storage slice of each sequence's keys after this step (cached + new)


class SlotKVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.slots, self.max_len = slots, max_len
        shape = (num_kv_heads, slots * max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.free = list(range(slots))
        self.plan: StepPlan | None = None

    def allocate(self) -> int | None:
        return self.free.pop(0) if self.free else None

    def release(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)

    def set_plan(self, entries: list[tuple[int, int, int]]) -> None:
        """``entries``: (slot, tokens already cached, new tokens) per sequence, in stream order."""
        index, q_ranges, k_ranges, cursor = [], [], [], 0
        for slot, cached, new in entries:
            if cached + new > self.max_len:
                raise ValueError(f"sequence needs {cached + new} positions, the cache holds {self.max_len} per slot")
            base = slot * self.max_len
            index.append(torch.arange(base + cached, base + cached + new))
            q_ranges.append((cursor, cursor + new))
            k_ranges.append((base, base + cached + new))
            cursor += new
        device = self.k[0].device
        self.plan = StepPlan(torch.cat(index).to(device), q_ranges, k_ranges)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write this step's keys/values (1,K,T,d) into their slots, then attend: q (1,H,T,d) -> (T,H,d)."""
        plan = self.plan
        assert plan is not None, "set_plan before the forward"
        self.k[layer].index_copy_(1, plan.write_index, k[0].to(self.k[layer].dtype))
        self.v[layer].index_copy_(1, plan.write_index, v[0].to(self.v[layer].dtype))
        return ranges_attention(q, self.k[layer][None], self.v[layer][None], plan.q_ranges, plan.k_ranges, scale)
