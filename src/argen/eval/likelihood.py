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
    bits_per_position: torch.Tensor  # (L,) mean over the items, in the order's target layout


@torch.no_grad()
def likelihood(model: torch.nn.Module, tokens: Dataset, batch_size: int = 256) -> Likelihood | None:
    """Mean -log2 p(token | what the order conditions it on, class) over every token of `tokens` (items: (ids (L,),
    label)), through the order's own loss (`model.loss(...)`), and the same at each target position. None for an
    order that defines no likelihood (masked generation trains on random masks: its loss is not a sequence
    likelihood)."""
    model.eval()
    device = next(model.parameters()).device
    per_position, items = None, 0
    for ids, labels in DataLoader(tokens, batch_size=batch_size):
        out = model.loss(ids.to(device), Condition.classes(labels.to(device)))
        if out.nll_targets is None:
            return None
        summed = out.nll_targets.double().sum(0).cpu()
        per_position = summed if per_position is None else per_position + summed
        items += out.nll_targets.shape[0]
    bits = per_position / items / math.log(2)
    return Likelihood(bits.mean().item(), bits.float())
