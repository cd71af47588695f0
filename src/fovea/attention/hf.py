"""fovea's backends registered with transformers' ``AttentionInterface``, so any Llama/Qwen2-family decoder runs
packed without being reimplemented.

The packing metadata travels as explicit keyword arguments through the model's forward (``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``: transformers' own names), never inferred from position ids:
transformers skips its packed-sequence detection when a cache object exists, which leaks attention across sequences.

Notation: B rows, H query heads, K key/value heads, L query length, S key length, T packed tokens, d head width.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fovea.attention.backends import BACKENDS, resolve_backend

PREFIX = "fovea_"


def _no_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """fovea's backends build their masks from cu_seqlens, so transformers need not materialise a (T, S) mask.
    They take no padding: a 2-D mask with zeros means a padded batch, which fovea packs instead."""
    if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
        raise ValueError("fovea attention backends take packed batches (cu_seq_lens), not padding masks; "
                         "pack the sequences with fovea.packing.pack()")
    if attention_mask is not None and attention_mask.dtype != torch.bool and not bool((attention_mask != 0).all()):
        raise ValueError("fovea attention backends take packed batches (cu_seq_lens), not padding masks; "
                         "pack the sequences with fovea.packing.pack()")
    return None


def _adapter(name: str):
    backend = BACKENDS[name]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                  cu_seq_lens_k=None, max_length_q=None, max_length_k=None, fovea_cache=None, **kwargs):
        b, h, lq, d = query.shape
        if fovea_cache is not None:  # the engine's slot cache: keys are written and read in place
            return fovea_cache.attend(module.layer_idx, query, key, value, scaling).reshape(b, lq, h, d), None
        lk = key.shape[2]
        if cu_seq_lens_q is None:  # unpacked: each row is one whole sequence
            dev = query.device
            cu_q = torch.arange(0, (b + 1) * lq, lq, device=dev, dtype=torch.int32)
            cu_k = torch.arange(0, (b + 1) * lk, lk, device=dev, dtype=torch.int32)
            max_q, max_k = lq, lk
            # (B,H,L,d) -> (1,H,B*L,d): rows laid end to end as one stream
            query = query.transpose(0, 1).reshape(1, h, b * lq, d)
            key = key.transpose(0, 1).reshape(1, key.shape[1], b * lk, d)
            value = value.transpose(0, 1).reshape(1, value.shape[1], b * lk, d)
        else:
            if b != 1:
                raise ValueError(f"a packed batch is one row (1, T); got {b} rows with cu_seq_lens")
            cu_q = cu_seq_lens_q
            cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
            if int(cu_q[-1]) != lq or int(cu_k[-1]) != lk:
                raise ValueError(f"cu_seq_lens cover {int(cu_q[-1])} queries and {int(cu_k[-1])} keys, but the "
                                 f"stream has {lq} queries and {lk} keys (pass cu_seq_lens_k when a cache adds keys)")
            max_q = max_length_q if max_length_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
            max_k = max_length_k if max_length_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        out = backend.fn(query, key, value, cu_q, cu_k, max_q, max_k, scaling, dropout)  # (B*L,H,d)
        return out.reshape(b, lq, h, d), None

    attention.__name__ = f"{PREFIX}{name}_attention"
    return attention


for _name in BACKENDS:
    AttentionInterface.register(PREFIX + _name, _adapter(_name))
    AttentionMaskInterface.register(PREFIX + _name, _no_mask)


def use_backend(lm: torch.nn.Module, name: str = "auto") -> str:
    """Switch a transformers decoder to a fovea backend (after checking it can run here); returns its name."""
    backend = resolve_backend(name, next(lm.parameters()).device)
    lm.set_attn_implementation(PREFIX + backend.name)
    return backend.name
