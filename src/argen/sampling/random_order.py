"""RandAR's position policy: each sample follows its own permutation, several positions per step.

The permutation is drawn from the sample's own generator, so a seed gives the same image alone or in any batch.
Known tokens (editing) come first in the order: everything generated then sees them, which is how RandAR
(arXiv 2412.01827) does zero-shot in- and out-painting without any training for it. The number of positions per
step is a plain function of progress, the same for every sample.
"""

from __future__ import annotations

import math

import torch

from argen.models.interface import DecodeState
from argen.sampling.positions import PositionPolicy


def filled_fraction(t: float) -> float:
    """Share of the tokens filled once progress t in [0, 1] is reached: MaskGIT's cosine schedule (its masked
    share is cos(pi/2 t)), which RandAR's parallel decoding follows: few tokens per step at first, while the
    context is thin, more later."""
    return 1.0 - math.cos(math.pi / 2 * t)


def tokens_per_step(seq_len: int, steps: int) -> list[int]:
    """How many positions each of `steps` steps fills: the schedule's share per step of `seq_len`, rounded to
    whole tokens (at least one each, `seq_len` in all, non-decreasing); steps == seq_len gives one per step."""
    if not 1 <= steps <= seq_len:
        raise ValueError(f"steps must be in 1..{seq_len}, got {steps}")
    ideal = [seq_len * (filled_fraction(i / steps) - filled_fraction((i - 1) / steps)) for i in range(1, steps + 1)]
    counts = [max(1, math.floor(c)) for c in ideal]
    while sum(counts) < seq_len:  # hand the rounding remainder to the steps furthest below their share
        i = max(range(steps), key=lambda j: (ideal[j] - counts[j], j))
        counts[i] += 1
    while sum(counts) > seq_len:  # the floor of one token per step overshot: take from the largest
        counts[max(range(steps), key=lambda j: (counts[j], j))] -= 1
    return sorted(counts)  # the ideal shares grow with progress; rounding must not break that


class RandomOrderPolicy(PositionPolicy):
    """Positions along a per-sample permutation: known positions first, then the rest ("random": shuffled with
    the sample's generator; "raster": in raster order, the identity when nothing is known)."""

    def begin(self, state: DecodeState) -> None:
        L = state.tokens.shape[1]
        B = self.num_samples
        known = self.known.known.cpu() if self.known is not None else torch.zeros(B, L, dtype=torch.bool)
        raster = self.options is not None and self.options.order == "raster"
        keys = []
        for b in range(B):
            if raster:
                key = torch.arange(L) / L
            else:
                g = self.generators[b] if self.generators is not None else None
                key = torch.rand(L, generator=g, device=g.device if g is not None else "cpu").cpu()
            keys.append(key + (~known[b]).float())  # known keys in [0, 1), the rest in [1, 2)
        self.orders = torch.stack(keys).argsort(dim=1, stable=True).to(state.tokens.device)  # (B, L)
        counts = tokens_per_step(L, state.num_steps)
        self.counts, self.offsets = counts, [sum(counts[:i]) for i in range(len(counts))]

    def order(self) -> torch.Tensor:
        return self.orders

    def positions(self, state: DecodeState) -> torch.Tensor:
        """(B, n) the next n positions of each sample's order, n = tokens_per_step's count for this step."""
        start = self.offsets[state.step]
        return self.orders[:, start : start + self.counts[state.step]]
