"""Held-out accuracy for tasks whose completions come from a small label set.

The model's answer is the label whose first completion token scores highest at the
end of the prompt (the zero-shot protocol of ``docs/data.md``). Under ZeRO-3 or
FSDP2 the forward is a collective, so every rank runs the same number of batches on
its share of the examples and the counts are summed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .access import world as ranks
from .formats import PromptStyle

MAX_LABELS = 32


def label_token_ids(records: list, tok, style: Optional[PromptStyle] = None) -> Optional[dict]:
    """label completion -> first token id (of the text the model answers with, in ``style``); None if the
    task is not a small label set or two labels share their first token."""
    style = style or PromptStyle(tok, chat=False)
    labels = sorted({r.get("completion") for r in records if isinstance(r.get("completion"), str)})
    if not labels or len(labels) > MAX_LABELS:
        return None
    ids = {l: tok(style.label_text(l), add_special_tokens=False)["input_ids"][0] for l in labels}
    return ids if len(set(ids.values())) == len(ids) else None


@torch.no_grad()
def choice_accuracy(model, tok, records: list, batch_size: int = 16, style: Optional[PromptStyle] = None) -> Optional[float]:
    """Fraction of ``records`` whose completion scores highest among the label set (prompts put before
    the model in ``style``: raw, or through the chat template)."""
    style = style or PromptStyle(tok, chat=False)
    ids = label_token_ids(records, tok, style)
    if ids is None or not records:
        return None
    labels = list(ids)
    cand = torch.tensor([ids[l] for l in labels])
    rank, world = ranks()
    mine = records[rank::world]
    n_batches = math.ceil(math.ceil(len(records) / world) / batch_size)
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    correct = torch.zeros(2, dtype=torch.float64)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real = len(chunk)
        if real == 0:  # keep collectives in step: run a dummy batch and count nothing
            chunk = records[:1]
        enc = [style.prompt_ids(r["prompt"]) for r in chunk]
        n = max(len(e) for e in enc)
        x = torch.full((len(enc), n), pad, dtype=torch.long)
        m = torch.zeros((len(enc), n), dtype=torch.long)
        for i, e in enumerate(enc):
            x[i, :len(e)] = torch.tensor(e)
            m[i, :len(e)] = 1
        logits = model(input_ids=x.to(device), attention_mask=m.to(device)).logits
        last = m.sum(1) - 1
        scores = logits[torch.arange(len(enc)), last.to(device)][:, cand.to(device)].float().cpu()
        pred = scores.argmax(1)
        gold = torch.tensor([labels.index(r["completion"]) for r in chunk])
        if real:
            correct[0] += (pred == gold).sum().item()
            correct[1] += real
    if world > 1:
        dist.all_reduce(correct)
    model.train(was_training)
    return float(correct[0] / correct[1])
