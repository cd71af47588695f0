"""Scatter visual tokens into the text embeddings at the image placeholders, with the count checked.

Notation: B sequences, L tokens (or T packed tokens with B=1), D width, N visual tokens in total.
"""

from __future__ import annotations

import torch


def merge_visual_tokens(
    text_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, visual: torch.Tensor
) -> torch.Tensor:
    """``text_embeds`` (..., D) with the rows where ``input_ids`` == ``image_token_id`` replaced, in order, by
    ``visual`` (N, D). A count mismatch is a ValueError naming both numbers."""
    mask = input_ids == image_token_id  # (...,)
    placeholders = int(mask.sum())
    if placeholders != visual.shape[0]:
        raise ValueError(
            f"prompt has {placeholders} image placeholder tokens but the images produced {visual.shape[0]} "
            "visual tokens; build prompts with fovea's Processor so the counts agree"
        )
    if placeholders == 0:
        return text_embeds
    return text_embeds.masked_scatter(mask[..., None], visual.to(text_embeds.dtype))  # (..., D)
