"""Logit processors and the per-sample draw: which token value is chosen."""

from __future__ import annotations

import torch

from argen.errors import NonFiniteError


def check_finite(logits: torch.Tensor, where: str = "logits") -> None:
    # one pass over the logits: the extremes are NaN if any value is, and infinite if any value is
    if logits.numel() and not torch.isfinite(torch.stack(torch.aminmax(logits))).all():
        bad = (~torch.isfinite(logits)).sum().item()
        raise NonFiniteError(
            f"{where} contain {bad} non-finite values (NaN/inf): the model or its weights are broken "
            "(check the checkpoint, the dtype, and the guidance scale)"
        )


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return logits / max(temperature, 1e-5)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest along the last axis (ties kept); k <= 0 keeps all; k is clamped to V."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest most-likely set whose probability reaches p (the token that crosses p
    is kept, so at least one token always survives). p >= 1 keeps all."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (LlamaGen's order)."""
    return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)


def draw(logits: torch.Tensor, generators: list[torch.Generator] | None, greedy: bool = False) -> torch.Tensor:
    """(B, n, V) processed logits -> (B, n) ids. Row b draws only from generators[b], so a sample does not depend
    on what else is in the batch. Inverse-CDF sampling keeps one uniform draw per token."""
    if greedy:
        return logits.argmax(dim=-1)
    B, n, V = logits.shape
    if generators is not None and len(generators) != B:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {B}")
    probs = logits.float().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    ids = torch.empty(B, n, dtype=torch.long, device=logits.device)
    for b in range(B):
        g = generators[b] if generators is not None else None
        u = torch.rand(n, 1, generator=g, device=g.device if g is not None else "cpu").to(logits.device)
        u = u * cdf[b, :, -1:]  # the cumulative sum may fall short of 1 by rounding
        ids[b] = torch.searchsorted(cdf[b], u).squeeze(-1).clamp_(max=V - 1)
    return ids
