"""Varlen attention backends with one signature, over one packed stream.

Notation: H query heads, K key/value heads (H % K == 0), T packed query tokens, S packed key tokens, d head
width, N sequences. ``cu_q`` (N+1,) and ``cu_k`` (N+1,) are cumulative sequence lengths. Causality is aligned
bottom-right in every sequence (query i of a sequence whose keys are longer by p sees keys 0..i+p), which is what a
chunked prefill or a decode step over a cache needs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# fn(q (1,H,T,d), k (1,K,S,d), v (1,K,S,d), cu_q, cu_k, max_q, max_k, scale, dropout) -> (T,H,d)
BackendFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str  # registry key
    fn: BackendFn  # the attention function
    available: Callable[[torch.device | None], str | None]  # None if it can run on this device, else why not
    doc: str  # one line for `fovea info`


def _bounds(cu: torch.Tensor) -> list[int]:
    return cu.tolist()


def _causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """(q_len, k_len) bool, bottom-right aligned: True = may attend."""
    offset = k_len - q_len
    return torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset


def ranges_attention(q, k, v, q_ranges, k_ranges, scale, dropout=0.0):
    """Attention of query slices over key slices, one pair per sequence: q[:, :, qs:qe] attends to k[:, :, ks:ke]
    bottom-right causally. The key slices may lie anywhere in ``k`` (a KV cache read in place). -> (T,H,d)"""
    outs = []
    gqa = q.shape[1] != k.shape[1]
    for (qs, qe), (ks, ke) in zip(q_ranges, k_ranges, strict=True):
        qi, ki, vi = q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke]  # (1,H,Lq,d), (1,K,Lk,d)
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        if lq == lk or lq == 1:  # plain causal, or one query that sees every key: no mask needed
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=lq == lk and lq > 1, dropout_p=dropout,
                                                 scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=_causal_mask(lq, lk, q.device),
                                                 dropout_p=dropout, scale=scale, enable_gqa=gqa)
        outs.append(out)
    return torch.cat(outs, dim=2)[0].transpose(0, 1)  # (1,H,T,d) -> (T,H,d)


def segments_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
    """Per-sequence SDPA over slices of the stream: cost sum(Lq_i * Lk_i), nothing padded. The CPU default."""
    return ranges_attention(q, k, v, _pairs(_bounds(cu_q)), _pairs(_bounds(cu_k)), scale, dropout)


def _pairs(bounds: list[int]) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _sequence_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) index of the sequence each stream position belongs to."""
    return torch.bucketize(torch.arange(total, device=cu.device), cu[1:].to(torch.long), right=True)


def _frontier(cu_q: torch.Tensor, cu_k: torch.Tensor, seq_q: torch.Tensor) -> torch.Tensor:
    """(T,) last key index (in the stream) each query may see: bottom-right causal inside its own sequence.
    For query t of sequence n: t + cu_k[n+1] - cu_q[n+1]."""
    t = torch.arange(seq_q.shape[0], device=seq_q.device)
    return t + cu_k.to(torch.long)[seq_q + 1] - cu_q.to(torch.long)[seq_q + 1]


def block_causal_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int) -> torch.Tensor:
    """(T, S) bool: query t may see key s iff both are in the same sequence and s is not in t's future."""
    seq_q, seq_k = _sequence_ids(cu_q, total_q), _sequence_ids(cu_k, total_k)
    keys = torch.arange(total_k, device=cu_k.device)
    return (seq_q[:, None] == seq_k[None, :]) & (keys[None, :] <= _frontier(cu_q, cu_k, seq_q)[:, None])


def dense_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
    """One SDPA over the whole stream with an explicit (T, S) block-diagonal causal mask: the slow reference."""
    mask = block_causal_mask(cu_q, cu_k, q.shape[2], k.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)  # (1,H,T,d) -> (T,H,d)


def flex_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
    """FlexAttention with a document block mask: skips whole blocks outside the diagonal (compiled on GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dropout:
        raise ValueError(f"the flex backend has no attention dropout; got dropout={dropout}")
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("the flex backend has no backward pass on CPU; use 'segments' for CPU training")
    total_q, total_k = q.shape[2], k.shape[2]
    seq_q, seq_k = _sequence_ids(cu_q, total_q), _sequence_ids(cu_k, total_k)
    frontier = _frontier(cu_q, cu_k, seq_q)

    def mask_mod(b, h, q_idx, kv_idx):
        return (seq_q[q_idx] == seq_k[kv_idx]) & (kv_idx <= frontier[q_idx])

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=total_q, KV_LEN=total_k, device=q.device)
    out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)  # (1,H,T,d) -> (T,H,d)


def flash_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
    """flash-attn's ``flash_attn_varlen_func`` on the stream (CUDA, fp16/bf16)."""
    from flash_attn import flash_attn_varlen_func

    out = flash_attn_varlen_func(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),  # (1,H,T,d) -> (T,H,d)
        cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_q=int(max_q),
        max_seqlen_k=int(max_k), dropout_p=dropout, softmax_scale=scale, causal=True,
    )
    return out  # (T,H,d)


def _always(device: torch.device | None) -> str | None:
    return None


def _flex_available(device: torch.device | None) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)"
    return None


def _flash_available(device: torch.device | None) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install flash-attn on a CUDA machine)"
    if device is None or device.type != "cuda":
        return f"flash-attn needs a CUDA device, the model is on {device or 'cpu'}"
    return None


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in BACKENDS:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


register_backend(Backend("segments", segments_attention, _always, "per-sequence SDPA; cost sum Li^2; CPU default"))
register_backend(Backend("dense", dense_attention, _always, "explicit block-diagonal causal mask; the reference"))
register_backend(Backend("flex", flex_attention_varlen, _flex_available, "FlexAttention document mask; GPUs"))
register_backend(Backend("flash_varlen", flash_varlen_attention, _flash_available, "flash_attn_varlen_func; CUDA"))


def resolve_backend(name: str, device: torch.device | None = None) -> Backend:
    """The backend called ``name`` if it can run on ``device``; ``auto`` picks flash_varlen, then flex on CUDA,
    then segments."""
    if name == "auto":
        for candidate in ("flash_varlen", "flex"):
            if device is not None and device.type == "cuda" and BACKENDS[candidate].available(device) is None:
                return BACKENDS[candidate]
        return BACKENDS["segments"]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: auto, {', '.join(sorted(BACKENDS))}")
    reason = BACKENDS[name].available(device)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run here: {reason}")
    return BACKENDS[name]
