"""Position policies: who chooses which positions a step predicts and which of them it commits.

Raster and next-scale take the positions their model generates next ("next"). Orders whose positions are
chosen by a random or data-dependent rule (MaskGIT's confidence, RandAR's permutation) have a policy here in
`sampling/`, because the rule draws from the per-sample generators: a seed then gives the same image alone
or in any batch. An order names its policy in `model.order.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from argen.models.interface import DecodeState, Generator


@dataclass
class KnownTokens:
    """Tokens to keep instead of sampling (zero-shot editing, VAR §4.4): where `known` (B, L) is True the value in
    `tokens` (B, L) is committed whatever the model predicts, so the rest is generated around it."""

    tokens: torch.Tensor  # (B, L) ids, or (B, L, D) vectors for a continuous order
    known: torch.Tensor  # (B, L) bool

    def apply(self, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, n) chosen values (or (B, n, D) vectors) at (B, n) positions -> the known value wherever the
        position is known."""
        known = self.known.gather(1, positions)
        if self.tokens.dim() == 2:
            return torch.where(known, self.tokens.gather(1, positions), values)
        index = positions[..., None].expand(-1, -1, self.tokens.shape[-1])
        return torch.where(known[..., None], self.tokens.gather(1, index).to(values.dtype), values)

    def rows(self, index: slice) -> KnownTokens:
        return KnownTokens(self.tokens[index], self.known[index])


class PositionPolicy:
    """The policy of orders that generate their own next positions: ask the model, commit everything."""

    def __init__(
        self,
        model: Generator,
        options: Any,
        num_samples: int,
        generators: list[torch.Generator] | None = None,
        known: KnownTokens | None = None,
    ):
        """num_samples: B; the state holds B rows, or 2B under guidance (the conditional rows, then one
        unconditional row per sample), and `positions`/`select` speak of the B samples."""
        self.model, self.options, self.num_samples = model, options, num_samples
        self.generators, self.known = generators, known

    def begin(self, state: DecodeState) -> None:
        """Called once after `start`, before the first step."""

    def write_known(self, state: DecodeState) -> None:
        """Write known tokens (in- and out-painting) into every row as filled: under guidance the state holds the
        conditional rows, then the unconditional ones, and both see the same canvas."""
        if self.known is None:
            return
        copies = state.tokens.shape[0] // self.num_samples
        known = self.known.known.to(state.filled.device).repeat(copies, 1)  # (copies * B, L)
        values = self.known.tokens.to(state.tokens.device, state.tokens.dtype)
        values = values.repeat(copies, *([1] * (values.dim() - 1)))
        mask = known if values.dim() == 2 else known[..., None]
        state.tokens.copy_(torch.where(mask, values, state.tokens))
        state.filled |= known

    def guidance_progress(self, state: DecodeState) -> torch.Tensor:
        """(B,) progress in [0, 1] each sample's guidance schedule reads at this step (the state's by default)."""
        return torch.full((self.num_samples,), state.progress, dtype=torch.float64)

    def positions(self, state: DecodeState) -> torch.Tensor | None:
        """(B, n) positions the next step predicts for the B samples, or None for the model's own."""
        return None

    def order(self) -> torch.Tensor | None:
        """(B, L) the order each sample's positions will be filled in, where the policy fixes it at `begin`
        (random order: what speculative decoding drafts along); None: the model's own (raster), or decided step
        by step (masked)."""
        return None

    def select(
        self, state: DecodeState, positions: torch.Tensor, logits: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the (B, n) predicted positions, their processed logits (B, n, V) and drawn values (B, n): which
        positions and values to commit."""
        return positions, values


def policy_class(name: str) -> type[PositionPolicy]:
    """The policy an order names; the random ones live beside their sampling rule."""
    if name == "next":
        return PositionPolicy
    if name == "masked":
        from argen.sampling.masked import MaskedPolicy

        return MaskedPolicy
    if name == "random":
        from argen.sampling.random_order import RandomOrderPolicy

        return RandomOrderPolicy
    if name == "mar":
        from argen.sampling.mar import MARPolicy

        return MARPolicy
    raise ValueError(f"unknown position policy {name!r}")
