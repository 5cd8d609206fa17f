"""The step interface every generator exposes to the sampler (see DESIGN.md "Contracts").

The sampler never imports a concrete model: it starts a decode state, asks for the logits of the
next set of positions, and advances the state with the ids it chose. Sampling policy (guidance,
top-k, randomness) stays in `argen.sampling`.

Optional steps, used where a model has them: `predict_rows(state, starts, length)` (speculative decoding
checks every sample's drafted block, each at its own position, in one pass) and
`predict_at(state, targets, inputs)` (parallel decoding of positions out of order). Raster models have both;
next-scale models neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class DecodeState:
    """Where one batch's decoding stands. `tokens` (B, L) holds -1 where nothing was chosen yet."""

    labels: torch.Tensor  # (B,) class ids; the null class for unconditional rows
    tokens: torch.Tensor  # (B, L) int64
    step: int = 0  # prediction steps taken so far
    num_steps: int = 0
    cache: Any = None  # the model's KV cache
    span: tuple[int, int] = (0, 0)  # token positions the last `predict` was for
    extra: dict[str, Any] = field(default_factory=dict)  # order-specific bookkeeping

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps


@runtime_checkable
class Generator(Protocol):
    num_classes: int  # class ids 0..num_classes-1; num_classes itself is the null class
    vocab_size: int
    seq_len: int  # tokens per image

    def start(self, labels: torch.Tensor) -> DecodeState:
        """Begin decoding for (B,) labels."""

    def predict(self, state: DecodeState) -> torch.Tensor:
        """(B, n, V) float logits for the n positions the order generates at this step."""

    def advance(self, state: DecodeState, ids: torch.Tensor) -> None:
        """Commit (B, n) chosen ids for those positions."""
