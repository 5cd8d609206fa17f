"""Test-set negative log-likelihood of an AR prior, in bits per token (no extra network needed)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from argen.models.interface import Condition


@torch.no_grad()
def bits_per_token(model: torch.nn.Module, tokens: Dataset, batch_size: int = 256) -> float | None:
    """Mean -log2 p(token | what the order conditions it on, class) over every token of `tokens` (items: (ids (L,),
    label)), through the order's own loss (`model.loss(...).nll_sum`). None for an order that defines no
    likelihood (masked generation trains on random masks: its loss is not a sequence likelihood)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, labels in DataLoader(tokens, batch_size=batch_size):
        out = model.loss(ids.to(device), Condition.classes(labels.to(device)))
        if out.nll_sum is None:
            return None
        total += out.nll_sum.item()
        count += out.num_targets
    return total / count / math.log(2)
