"""Test-set negative log-likelihood of an AR prior, in bits per token (no extra network needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from argen.models.interface import Condition


@dataclass
class Likelihood:
    bits_per_token: float
    bits_per_position: torch.Tensor | None  # (L,) mean over the items, in the order's target layout; None where
    # the order's loss reports no per-target figures


@torch.no_grad()
def likelihood(model: torch.nn.Module, tokens: Dataset, batch_size: int = 256) -> Likelihood | None:
    """Mean -log2 p(token | what the order conditions it on, class) over every token of `tokens` (items: (ids (L,),
    label)), through the order's own loss (`model.loss(...)`), and the same at each target position. None for an
    order that defines no likelihood (masked generation trains on random masks: its loss is not a sequence
    likelihood)."""
    model.eval()
    device = next(model.parameters()).device
    total, count, per_position, items = 0.0, 0, None, 0
    for ids, labels in DataLoader(tokens, batch_size=batch_size):
        out = model.loss(ids.to(device), Condition.classes(labels.to(device)))
        if out.nll_sum is None:
            return None
        total += out.nll_sum.item()
        count += out.num_targets
        if out.nll_targets is not None:
            summed = out.nll_targets.double().sum(0).cpu()
            per_position = summed if per_position is None else per_position + summed
            items += out.nll_targets.shape[0]
    by_position = None if per_position is None else (per_position / items / math.log(2)).float()
    return Likelihood(total / count / math.log(2), by_position)


def bits_per_token(model: torch.nn.Module, tokens: Dataset, batch_size: int = 256) -> float | None:
    """`likelihood`'s mean bits per token alone."""
    found = likelihood(model, tokens, batch_size)
    return None if found is None else found.bits_per_token
