"""The model runner: the one forward of the LLM per step over the packed stream, through fovea's slot KV cache,
and the sampling of the next tokens.

Notation: T stream tokens in a step, D LLM width, N sequences sampled in a step, V vocabulary.
"""

from __future__ import annotations

import torch

from fovea.attention import use_backend
from fovea.engine.cache import SlotKVCache
from fovea.engine.config import EngineConfig
from fovea.engine.sampling import sample
from fovea.engine.scheduler import Chunk
from fovea.model import VLM


class ModelRunner:
    """Owns the slot KV cache. The LLM is the unmodified transformers decoder; the cache reaches its attention
    through a keyword argument (``fovea_cache``), the way transformers' own continuous batching passes its paged
    cache."""

    def __init__(self, model: VLM, config: EngineConfig, backend: str = "segments") -> None:
        self.model = model
        lm = model.lm
        use_backend(lm, backend)
        lm_cfg = lm.config
        head_dim = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
        limit = getattr(lm_cfg, "max_position_embeddings", config.max_len)
        if config.max_len > limit:
            raise ValueError(f"engine max_len {config.max_len} exceeds the LLM's {limit} positions")
        self.kv = SlotKVCache(
            num_layers=lm_cfg.num_hidden_layers, num_kv_heads=lm_cfg.num_key_value_heads, head_dim=head_dim,
            slots=config.max_batch, max_len=config.max_len, dtype=lm.dtype, device=model.device,
        )

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[int]:
        """One packed forward over ``chunks`` (decode chunks first, as the scheduler plans them); the next token
        of every chunk that samples, in chunk order."""
        model, device = self.model, self.model.device
        decode = [c for c in chunks if c.decode]
        if any(c.decode for c in chunks[len(decode):]):
            raise ValueError("decode chunks must come first in a step's stream")
        pieces = []
        if decode:  # one embedding lookup for every decode token of the step
            ids = torch.tensor([c.request.tokens[-1] for c in decode], device=device)
            pieces.append(model.lm.get_input_embeddings()(ids))  # (n_decode,D)
        pieces += [c.request.prompt_embeds[c.start:c.start + c.length] for c in chunks if not c.decode]
        self.kv.set_plan([(c.request.slot, c.start, c.length) for c in chunks])
        stream = torch.cat(pieces)[None]  # (1,T,D)
        position_ids = torch.cat([torch.arange(c.start, c.start + c.length) for c in chunks])[None].to(device)  # (1,T)
        hidden = model.lm.model(inputs_embeds=stream, position_ids=position_ids, use_cache=False,
                                fovea_cache=self.kv).last_hidden_state  # (1,T,D)
        ends = torch.tensor([c.length for c in chunks]).cumsum(0) - 1  # (chunks,) last stream row of each
        rows = [int(ends[i]) for i, c in enumerate(chunks) if c.samples]
        sampled = [c.request for c in chunks if c.samples]
        logits = model.lm.get_output_embeddings()(hidden[0, rows])  # (N,V)
        return sample(logits, [r.params for r in sampled], [r.generator for r in sampled]).tolist()
