"""Test-set negative log-likelihood of an AR prior, in bits per token (no extra network needed)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def bits_per_token(model: torch.nn.Module, tokens: Dataset, batch_size: int = 256) -> float:
    """Mean -log2 p(token | prefix, class) over every token of `tokens` (items: (ids (L,), label)).
    The model is a teacher-forced generator: model(model.training_inputs(ids), labels) -> (B, L, V) logits."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, labels in DataLoader(tokens, batch_size=batch_size):
        ids, labels = ids.to(device), labels.to(device)
        logits = model(model.training_inputs(ids), labels)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="sum").item()
        count += ids.numel()
    return total / count / math.log(2)
