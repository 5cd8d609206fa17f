"""MaskGIT's iterative decoding as a position policy ("MaskGIT", Chang et al. 2022, §3.2).

Every step the model predicts the whole canvas and the loop draws a value at every position; this policy commits
the most confident of the still-masked positions and leaves the rest masked for the next step. How many stay
masked follows the order's mask schedule; the confidence of a drawn value is its log-probability plus Gumbel
noise that is annealed to zero over the steps, drawn from each sample's own generator so that a seed gives the
same image alone or in any batch.

The policy reads the order's options by their fields (`steps` via the state, `choice_temperature`,
`mask_ratio(t)`), never the model file that declares them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from argen.models.interface import DecodeState
from argen.sampling.positions import PositionPolicy


def commit_counts(
    masked_at_start: torch.Tensor, masked_now: torch.Tensor, step: int, num_steps: int, options: Any
) -> torch.Tensor:
    """(B,) positions to commit at `step` of `num_steps`, per sample from its own counts only.

    masked_at_start: (B,) positions masked before the first step (known tokens excluded); masked_now: (B,) still
    masked. MaskGIT §3.2 (mask schedule): floor(masked_at_start * mask_ratio((step + 1) / num_steps)) positions
    stay masked, but every step commits at least one while any is masked, and the last step commits all."""
    if step + 1 >= num_steps:
        return masked_now
    ratio = options.mask_ratio((step + 1) / num_steps)
    stay = (masked_at_start * ratio).floor().long()
    stay = torch.minimum(stay, masked_now - 1).clamp(min=0)
    return masked_now - stay


def gumbel(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n,) standard Gumbel noise, -log(-log u), from one sample's generator (None: the global RNG)."""
    u = torch.rand(n, generator=generator, device=generator.device if generator is not None else "cpu")
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny))).to(device)


def annealed_confidence(log_p: torch.Tensor, t: float, choice_temperature: float, noise: torch.Tensor) -> torch.Tensor:
    """MaskGIT §3.2 (their code's `mask_by_random_topk`): log p of the drawn values (B, n) plus Gumbel noise
    (B, n) scaled by choice_temperature * (1 - t), so early steps choose more freely and the last one by
    confidence alone."""
    return log_p + choice_temperature * (1.0 - t) * noise


class MaskedPolicy(PositionPolicy):
    """Confidence-based unmasking: commit the most confident drawn values, keep the rest masked (MaskGIT §3.2)."""

    def begin(self, state: DecodeState) -> None:
        """Known tokens are filled in every row before the first step (`write_known`)."""
        self.write_known(state)
        self.masked_at_start = (~state.filled).sum(dim=1)  # (rows,) what the mask schedule counts down from

    def select(
        self, state: DecodeState, positions: torch.Tensor, logits: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the (B, n) predicted positions, processed logits (B, n, V) and drawn values (B, n): the (B, k)
        positions and values to commit, k the largest count in the batch. A sample that commits fewer repeats
        its first choice (the same position and value again), so no sample depends on another."""
        B, n = values.shape
        filled = state.filled[:B].gather(1, positions)  # (B, n)
        counts = commit_counts(
            self.masked_at_start[:B], (~filled).sum(dim=1), state.step, state.num_steps, self.options
        )
        t = (state.step + 1) / state.num_steps  # MaskGIT's ratio: 1 at the last step
        log_p = logits.float().log_softmax(dim=-1).gather(-1, values[..., None]).squeeze(-1)  # (B, n)
        log_p = log_p.nan_to_num(nan=-math.inf).clamp(min=torch.finfo(log_p.dtype).min)  # below any filled one
        noise = torch.stack(
            [gumbel(n, None if self.generators is None else self.generators[b], values.device) for b in range(B)]
        )
        confidence = annealed_confidence(log_p, t, self.options.choice_temperature, noise)
        confidence = confidence.masked_fill(filled, -math.inf)  # filled positions are never chosen again
        k = max(int(counts.max()), 1)
        order = confidence.argsort(dim=1, descending=True, stable=True)[:, :k]  # (B, k) most confident first
        order = torch.where(torch.arange(k, device=order.device) < counts[:, None], order, order[:, :1])
        chosen = positions.gather(1, order)
        # A sample with nothing left to commit re-commits its first position with the value it already holds.
        kept = torch.where(filled.gather(1, order), state.tokens[:B].gather(1, chosen), values.gather(1, order))
        return chosen, kept
