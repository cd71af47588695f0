"""One packed stream per batch: sequences end to end, positions restarting at 0, explicit cu_seqlens.

Notation: N sequences, T packed tokens, D width, L_i length of sequence i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One sequence before packing: ids with image placeholders already expanded to the connector's count."""

    input_ids: torch.Tensor  # (L,) token ids
    labels: torch.Tensor | None = None  # (L,) targets, IGNORE_INDEX where no loss; None = no labels
    images: list[torch.Tensor] = field(default_factory=list)  # (3,H,W) per image, in placeholder order
    instructions: list[torch.Tensor] = field(default_factory=list)  # per image, instruction ids (Q-Former)
    visual_tokens: list[int] = field(default_factory=list)  # per image, its placeholder count (adjacent images)
    image_sizes: list[tuple[int, int]] | None = None  # per image, original (h, w); LLaVA-NeXT's layout needs it
    id: Any = None  # the record's id, for error messages

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (T,) every sequence's ids end to end
    position_ids: torch.Tensor  # (T,) 0..L_i-1 for each sequence
    cu_seqlens: torch.Tensor  # (N+1,) int32 cumulative lengths: sequence i is [cu[i], cu[i+1])
    max_seqlen: int  # longest sequence
    labels: torch.Tensor | None = None  # (T,) IGNORE_INDEX on prompt, image and each sequence's first position
    images: list[torch.Tensor] = field(default_factory=list)  # every image, in stream order
    instructions: list[torch.Tensor] = field(default_factory=list)  # per image instruction ids
    image_sizes: list[tuple[int, int]] | None = None  # per image original (h, w), when every sample gave them
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # (start, length) of each image's tokens
    ids: list[Any] = field(default_factory=list)  # sample ids, in stream order
    inputs_embeds: torch.Tensor | None = None  # (T,D) when the caller embedded the stream already

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def lm_kwargs(self) -> dict[str, Any]:
        """What a transformers decoder with a fovea backend needs, as (1, T) rows plus the packing metadata."""
        kwargs: dict[str, Any] = {
            "position_ids": self.position_ids[None],  # (1,T)
            "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen,
        }
        if self.labels is not None:
            kwargs["labels"] = self.labels[None]  # (1,T)
        return kwargs

    def unpack(self, stream: torch.Tensor) -> list[torch.Tensor]:
        """Split a (T, ...) or (1, T, ...) tensor back into per-sequence tensors."""
        if stream.shape[0] == 1 and stream.ndim > 1 and stream.shape[1] == self.num_tokens:
            stream = stream[0]
        return list(torch.split(stream, self.lengths))

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["images"] = [i.to(device) for i in self.images]
        moved["instructions"] = [i.to(device) for i in self.instructions]
        return PackedBatch(**moved)


def pack(samples: Sequence[Sample], *, image_token_id: int | None = None, capacity: int | None = None) -> PackedBatch:
    """Concatenate ``samples`` into one stream. With ``image_token_id`` the image spans are recorded and their
    placeholder count checked against each sample's images. ``capacity`` bounds the stream length."""
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    lengths = [len(s) for s in samples]
    if min(lengths) < 1:
        raise ValueError(f"sample {samples[lengths.index(0)].id!r} is empty; every sequence needs a token")
    total = sum(lengths)
    if capacity is not None and total > capacity:
        raise ValueError(f"{len(samples)} samples hold {total} tokens, more than the capacity of {capacity}")
    input_ids = torch.cat([s.input_ids for s in samples])  # (T,)
    position_ids = torch.cat([torch.arange(n) for n in lengths])  # (T,)
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    labels = None
    if any(s.labels is not None for s in samples):
        parts = []
        for s in samples:
            lab = s.labels.clone() if s.labels is not None else torch.full_like(s.input_ids, IGNORE_INDEX)
            if lab.shape != s.input_ids.shape:
                raise ValueError(f"sample {s.id!r}: labels {tuple(lab.shape)} do not match ids "
                                 f"{tuple(s.input_ids.shape)}")
            # The decoder shifts labels by one over the whole stream: the first token of each sequence would be
            # predicted from the previous sequence's last token. It is never a target.
            lab[0] = IGNORE_INDEX
            parts.append(lab)
        labels = torch.cat(parts)
        if image_token_id is not None:
            labels[input_ids == image_token_id] = IGNORE_INDEX
    spans: list[tuple[int, int]] = []
    if image_token_id is not None:
        for s, start in zip(samples, cu[:-1].tolist(), strict=True):
            spans.extend(_image_spans(s, image_token_id, start))
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, cu_seqlens=cu, max_seqlen=max(lengths), labels=labels,
        images=[i for s in samples for i in s.images], instructions=[i for s in samples for i in s.instructions],
        image_sizes=None if any(s.image_sizes is None for s in samples if s.images) else
        [size for s in samples for size in (s.image_sizes or [])],
        image_spans=spans, ids=[s.id for s in samples],
    )


def _image_spans(sample: Sample, image_token_id: int, offset: int) -> list[tuple[int, int]]:
    positions = (sample.input_ids == image_token_id).nonzero().flatten()
    counts = sample.visual_tokens
    if not counts:  # without counts, each run of placeholders is one image
        is_image = (sample.input_ids == image_token_id).to(torch.int8)
        edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))  # (L+1,)
        counts = ((edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()).tolist()
    if len(counts) != len(sample.images) or sum(counts) != len(positions):
        raise ValueError(f"sample {sample.id!r} has {len(positions)} image placeholders in {len(counts)} images' "
                         f"worth ({counts}) but {len(sample.images)} images")
    spans, cursor = [], 0
    for n in counts:
        spans.append((offset + int(positions[cursor]), n))
        cursor += n
    return spans
