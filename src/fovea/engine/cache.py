"""A slot KV cache that attention reads in place, the per-step plan that says where each token goes, and a prefix
cache that lets a prompt reuse the keys/values of an earlier prompt that started the same way.

Each request owns a slot of ``max_len`` positions in every layer. Storage per layer is (K, slots*max_len, d), so a
sequence's keys are one contiguous slice [slot*max_len, slot*max_len + length): the varlen backends attend to that
slice directly, nothing is gathered or padded. Decode tokens (one query each) go through one batched attention
call per layer that reads every slot's keys in place, each masked to its own length, instead of one call per
sequence.

Notation: K key/value heads, d head width, T tokens in the step's packed stream, H query heads, L prompt positions.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fovea.attention.backends import ranges_attention


@dataclass
class StepPlan:
    write_index: torch.Tensor  # (T,) flat storage position of every stream token
    q_ranges: list[tuple[int, int]]  # stream slice of each multi-token sequence's new tokens
    k_ranges: list[tuple[int, int]]  # storage slice of each multi-token sequence's keys (cached + new)
    ranges_rows: torch.Tensor | None  # (T_r,) stream rows of those sequences, or None when there are none
    one_rows: torch.Tensor | None  # (N1,) stream rows of one-token sequences (decode), or None when there are none
    one_slots: torch.Tensor | None  # (N1,) their slots
    one_mask: torch.Tensor | None  # (S1,1,1,L1) True where slot s may attend; S1 = highest such slot + 1


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
        index, q_ranges, k_ranges, ranges_rows, one_rows, one_slots, one_lens, cursor = [], [], [], [], [], [], [], 0
        for slot, cached, new in entries:
            if cached + new > self.max_len:
                raise ValueError(f"sequence needs {cached + new} positions, the cache holds {self.max_len} per slot")
            base = slot * self.max_len
            index.append(torch.arange(base + cached, base + cached + new))
            if new == 1:
                one_rows.append(cursor)
                one_slots.append(slot)
                one_lens.append(cached + 1)
            else:
                q_ranges.append((cursor, cursor + new))
                k_ranges.append((base, base + cached + new))
                ranges_rows.append(torch.arange(cursor, cursor + new))
            cursor += new
        device = self.k[0].device
        one_mask = None
        if one_rows:
            lengths = torch.ones(max(one_slots) + 1, dtype=torch.long)  # (S1,) idle slots see one key: no NaN
            lengths[one_slots] = torch.tensor(one_lens)
            one_mask = (torch.arange(max(one_lens))[None, :] < lengths[:, None])[:, None, None].to(device)
        self.plan = StepPlan(torch.cat(index).to(device), q_ranges, k_ranges,
                             torch.cat(ranges_rows).to(device) if ranges_rows else None,
                             torch.tensor(one_rows, device=device) if one_rows else None,
                             torch.tensor(one_slots, device=device) if one_slots else None, one_mask)

    def read(self, slot: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of a slot's first ``length`` positions: keys and values per layer, each (K,length,d)."""
        base = slot * self.max_len
        return ([k[:, base:base + length].clone() for k in self.k], [v[:, base:base + length].clone() for v in self.v])

    def write(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Fill a slot's first ``length`` positions from per-layer (K,>=length,d) keys and values."""
        base = slot * self.max_len
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.k[layer][:, base:base + length] = k[:, :length]
            self.v[layer][:, base:base + length] = v[:, :length]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write this step's keys/values (1,K,T,d) into their slots, then attend: q (1,H,T,d) -> (T,H,d)."""
        plan = self.plan
        assert plan is not None, "set_plan before the forward"
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(1, plan.write_index, k[0].to(keys.dtype))
        values.index_copy_(1, plan.write_index, v[0].to(values.dtype))
        if plan.one_rows is None:
            return ranges_attention(q, keys[None], values[None], plan.q_ranges, plan.k_ranges, scale)
        heads, dim = q.shape[1], q.shape[3]
        out = q.new_empty(q.shape[2], heads, dim)  # (T,H,d)
        if plan.ranges_rows is not None:
            out[plan.ranges_rows] = ranges_attention(q, keys[None], values[None], plan.q_ranges, plan.k_ranges, scale)
        mask = plan.one_mask
        used, length = mask.shape[0], mask.shape[-1]
        kv_heads = keys.shape[0]
        # (K, slots*max_len, d) -> (K, slots, max_len, d) -> (S1, K, L1, d): every slot's keys, read in place
        k_slots = keys.view(kv_heads, self.slots, self.max_len, dim).transpose(0, 1)[:used, :, :length]
        v_slots = values.view(kv_heads, self.slots, self.max_len, dim).transpose(0, 1)[:used, :, :length]
        q_slots = q.new_zeros(used, heads, 1, dim)  # (S1,H,1,d): each decode query at its slot's row
        q_slots[plan.one_slots, :, 0] = q[0, :, plan.one_rows].transpose(0, 1)
        attended = F.scaled_dot_product_attention(q_slots, k_slots, v_slots, attn_mask=mask, scale=scale,
                                                  enable_gqa=heads != kv_heads)  # (S1,H,1,d)
        out[plan.one_rows] = attended[plan.one_slots, :, 0]
        return out


@dataclass
class _Prefix:
    keys: torch.Tensor  # (L,) position keys of the prompt
    k: list[torch.Tensor]  # per layer (K,L,d)
    v: list[torch.Tensor]  # per layer (K,L,d)


class PrefixCache:
    """Keys/values of finished prompt prefills, reused by later prompts that begin with the same positions.

    A position's key is its token id, or, inside an image, the image's content hash and the position within it
    (``position_keys``), so a page asked about again reuses its system prompt and visual tokens and only the new
    question is prefilled. Causal attention makes a position's keys/values depend only on the positions before it,
    so any common prefix is reusable, to the token. A finished request's answer is kept with its prompt, so the
    next turn of a conversation (the same messages, the answer, a new question) prefills only what is new.
    Entries are whole prompts (or prompt + answer), evicted least recently used first;
    ``capacity`` bounds the positions held (memory: capacity x layers x 2 x K x d x dtype bytes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[int, _Prefix] = OrderedDict()
        self.held = 0  # positions held over all entries
        self._ids = 0
        self.stats = {"stored": 0, "evicted": 0}

    def match(self, keys: torch.Tensor) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``keys`` (L,), and that prefix's length (0: none)."""
        best, best_len = None, 0
        for entry_id, entry in self.entries.items():
            if min(len(entry.keys), len(keys)) <= best_len:
                continue
            length = shared_prefix(entry.keys, keys)
            if length > best_len:
                best, best_len = entry_id, length
        return best, best_len

    def load(self, keys: torch.Tensor, cache: SlotKVCache, slot: int, limit: int,
             found: tuple[int | None, int] | None = None) -> int:
        """Copy the longest cached prefix of ``keys`` (at most ``limit`` positions) into ``slot``; its length.
        ``found``: what ``match(keys)`` returned, when the caller already asked."""
        entry_id, length = found if found is not None else self.match(keys)
        length = min(length, limit)
        if entry_id is None or length <= 0:
            return 0
        entry = self.entries[entry_id]
        self.entries.move_to_end(entry_id)
        cache.write(slot, entry.k, entry.v, length)
        return length

    def store(self, keys: torch.Tensor, cache: SlotKVCache, slot: int) -> None:
        """Keep the first ``len(keys)`` positions of ``slot`` (a prefilled prompt, or a finished conversation turn)
        unless already held whole; an entry that is a prefix of ``keys`` is replaced, not duplicated."""
        entry_id, length = self.match(keys)
        if entry_id is not None and length == len(keys):
            self.entries.move_to_end(entry_id)
            return
        if len(keys) > self.capacity:
            return
        if entry_id is not None and length == len(self.entries[entry_id].keys):
            self.held -= len(self.entries.pop(entry_id).keys)
        while self.held + len(keys) > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.held -= len(old.keys)
            self.stats["evicted"] += 1
        k, v = cache.read(slot, len(keys))
        self._ids += 1
        self.entries[self._ids] = _Prefix(keys.clone(), k, v)
        self.held += len(keys)
        self.stats["stored"] += 1


def shared_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two (L,) key sequences."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def position_keys(input_ids: torch.Tensor, image_token_id: int, image_keys: list[str],
                  tokens_per_image: list[int]) -> torch.Tensor:
    """(L,) int64 keys naming what sits at each prompt position: the token id for text, and for the i-th position
    of an image a value derived from the image's content hash (bit 62 set, so it never equals a token id)."""
    keys = input_ids.to(torch.int64).clone()  # (L,)
    spans = []
    for key, n in zip(image_keys, tokens_per_image, strict=True):
        base = int(key[:15], 16) | (1 << 62)  # 60 hash bits; + position stays below 2**63
        spans.append(base + torch.arange(n, dtype=torch.int64))
    where = (input_ids == image_token_id).nonzero().flatten()
    if spans:
        values = torch.cat(spans)
        if len(values) != len(where):
            raise ValueError(f"{len(where)} image positions in the prompt but {len(values)} visual tokens")
        keys[where] = values
    return keys
