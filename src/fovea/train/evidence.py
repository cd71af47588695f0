"""Stage ``evidence``: the bridge learns to transcribe, into the LLM's own token embeddings, the text on the page
that answers each question (a record's ``evidence``: "Total due: $500.50", a clause's sentence, "Pets permitted:
No"; empty when the page does not answer).

Why a stage of its own: a language model already copies and reasons over text in its context. A bridge whose
visual tokens sit on the embeddings of the answering text hands the LLM a short, question-specific transcript of
the page, and learning that needs no LLM pass at all: the loss compares the bridge's outputs with rows of the
LLM's embedding table. On a CPU the LLM's forward and backward cost about 1.8 s a question, the bridge's a few
hundredths, so this stage sees tens of times more questions per CPU-hour than stage ``align``. Stage ``finetune``
(LM loss, LoRA) then teaches the LLM to answer from those tokens.

Target layout: evidence token ids first, then ``PAD_TEXT``'s token up to the budget Q; evidence longer than Q is
cut at Q. Loss: cross-entropy of each evidence position over the vocabulary (logits = visual token @ embedding
table^T, the tied LM head's reading of it) plus the squared distance of every position, padding included, to its
target embedding, relative to the table's mean squared norm (so the tokens also have the scale the LLM expects).

Notation: b questions, Q visual tokens (the budget), D LLM width, V vocabulary, n evidence positions in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

PAD_TEXT = "\n"  # what the visual tokens after the evidence transcribe: blank lines, which the LLM reads as nothing


def pad_id(tokenizer: Any) -> int:
    ids = tokenizer(PAD_TEXT, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the LLM's tokenizer splits the evidence padding {PAD_TEXT!r} into {len(ids)} tokens")
    return ids[0]


def check_evidence(records: Sequence[Any]) -> None:
    """A record without an ``evidence`` string is a ValueError naming it."""
    for r in records:
        if not isinstance(r.meta.get("evidence"), str):
            raise ValueError(f"record {r.id!r} has no 'evidence' text (stage evidence needs the page text that "
                             "answers each question; `fovea synth` writes it)")


def evidence_targets(records: Sequence[Any], tokenizer: Any, budget: int) -> tuple[list[torch.Tensor], int]:
    """Per record, its evidence as (Q,) token ids padded to ``budget``; and how many evidences were cut at Q.
    A record without an ``evidence`` string is a ValueError naming it."""
    check_evidence(records)
    pad, out, cut = pad_id(tokenizer), [], 0
    for r in records:
        text = r.meta["evidence"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        cut += len(ids) > budget
        ids = ids[:budget] + [pad] * max(0, budget - len(ids))
        out.append(torch.tensor(ids, dtype=torch.long))
    return out, cut


def group_by_page(samples: Sequence[Any]) -> list[list[int]]:
    """Sample indices per page, pages in order of first appearance. Cached samples of one page share one feature
    tensor (``fovea.train.features``), which is what identifies the page."""
    pages: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        if len(s.images) != 1:
            raise ValueError(f"stage evidence reads one page per question; record {s.id!r} shows {len(s.images)}")
        image = s.images[0]
        pages.setdefault(id(getattr(image, "features", image)), []).append(i)
    return list(pages.values())


def _visual_tokens(model, samples: Sequence[Any]) -> torch.Tensor:
    """The bridge's output for each sample's page and question, (b,Q,D) in fp32; each page's features go through
    the bridge once for all its questions (the Q-Former makes the page's keys and values once)."""
    out: list[torch.Tensor | None] = [None] * len(samples)
    for idx in group_by_page(samples):
        image = samples[idx[0]].images[0]
        features = model._encode_missing([image])[0][None]  # (1,C,h,w)
        instructions = [samples[i].instructions[0] for i in idx]
        tokens = model.connector(features, **model._instruction_inputs(instructions, range(len(idx))))  # (k,Q,D)
        for j, i in enumerate(idx):
            out[i] = tokens[j]
    return torch.stack(out).float()  # (b,Q,D)


def evidence_loss(model, samples: Sequence[Any], targets: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    """Mean token cross-entropy over the evidence positions plus the relative squared distance of all positions
    to their target embeddings (see the module docstring)."""
    out = _visual_tokens(model, samples)  # (b,Q,D)
    target = torch.stack(list(targets)).to(out.device)  # (b,Q)
    table = model.lm.get_input_embeddings().weight.float()  # (V,D), frozen
    distance = (out - table[target]).pow(2).sum(-1).mean() / table.pow(2).sum(-1).mean()
    real = target != pad  # (b,Q)
    if not bool(real.any()):
        return distance
    logits = out[real] @ table.T  # (n,D) @ (D,V) -> (n,V)
    return F.cross_entropy(logits, target[real]) + distance


@torch.no_grad()
def evidence_accuracy(model, samples: Sequence[Any], targets: Sequence[torch.Tensor], pad: int,
                      batch: int = 8) -> dict[str, float]:
    """What the LLM would read: each visual token's nearest vocabulary entry by the tied head's logits.
    ``token_accuracy`` over evidence positions; ``exact``: questions whose evidence positions are all right and
    whose padding reads as padding (an absent question's tokens must all be padding)."""
    right = total = exact = 0
    table = model.lm.get_input_embeddings().weight.float()
    for start in range(0, len(samples), batch):
        out = _visual_tokens(model, samples[start:start + batch])  # (b,Q,D)
        target = torch.stack(list(targets[start:start + batch])).to(out.device)  # (b,Q)
        read = (out @ table.T).argmax(-1)  # (b,Q,V) -> (b,Q)
        real = target != pad
        right += int((read == target)[real].sum())
        total += int(real.sum())
        exact += int((read == target).all(-1).sum())
    return {"token_accuracy": right / max(1, total), "exact_match": exact / max(1, len(samples))}
