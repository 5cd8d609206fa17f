"""The order contract: what every generator exposes to the sampler and to training (DESIGN.md "The order contract").

The sampler never imports a concrete model. It starts a decode state for a batch of conditions, asks the
generator for predictions at some positions, chooses values, and commits them:

    state = model.start(condition)
    while not state.done:
        prediction = model.predict(state, positions)     # positions (B, n), or None: the order's own next ones
        ...                                               # guidance, temperature, draws: argen.sampling
        model.advance(state, prediction.positions, values)

Values are discrete ids or continuous vectors, as the order declares (`OrderSpec.values`): a discrete order's
state holds (B, L) int64 ids and its predictions carry logits; a continuous one's (MAR) holds (B, L, D) floats
and its predictions carry a head's input `z`, which the sampler turns into values with the order's head.

Positions are per sample, so raster (one position), next-scale (a whole map), masked (a confidence-chosen
set), random-order (a permutation) and speculative verification (a drafted block at each sample's own
position) are all "these positions, these values". What is filled is a boolean mask, never a sentinel id.

Training goes through the order too: `model.loss(tokens, condition)` is the one definition of what the order
is trained against (the loop, the likelihood metric and the speed bench all call it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@dataclass
class Condition:
    """What each sample is conditioned on. Class ids today; text embeddings and their mask fit beside them later.

    `null` marks rows that carry no condition (guidance's unconditional rows, label dropout in training); how a
    model embeds "no condition" is its own business (a spare class row, a learned vector, an empty text), so no
    code outside the model assumes a particular null id.
    """

    class_ids: torch.Tensor  # (B,) int64 in 0..num_classes-1 (ignored where null)
    null: torch.Tensor | None = None  # (B,) bool; None = no row is null

    @classmethod
    def classes(cls, ids: torch.Tensor | list[int]) -> Condition:
        return cls(torch.as_tensor(ids, dtype=torch.long))

    def __len__(self) -> int:
        return self.class_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.class_ids.device

    @property
    def null_mask(self) -> torch.Tensor:
        return self.null if self.null is not None else torch.zeros_like(self.class_ids, dtype=torch.bool)

    def to(self, device: torch.device | str) -> Condition:
        return Condition(self.class_ids.to(device), None if self.null is None else self.null.to(device))

    def as_null(self) -> Condition:
        """The unconditional counterpart, row for row (what classifier-free guidance contrasts with)."""
        return Condition(self.class_ids, torch.ones_like(self.class_ids, dtype=torch.bool))

    def cat(self, other: Condition) -> Condition:
        return Condition(torch.cat([self.class_ids, other.class_ids]), torch.cat([self.null_mask, other.null_mask]))

    def rows(self, index: torch.Tensor | slice | list[int]) -> Condition:
        return Condition(self.class_ids[index], None if self.null is None else self.null[index])

    def dropped(self, p: float) -> Condition:
        """Training-time condition dropout for classifier-free guidance: each row becomes null with probability p."""
        if p <= 0:
            return self
        drop = torch.rand(self.class_ids.shape, device=self.device) < p
        return Condition(self.class_ids, self.null_mask | drop)

    def embedding_ids(self, num_classes: int) -> torch.Tensor:
        """(B,) rows of a class-embedding table with one extra row for "no condition" (LlamaGen's and VAR's
        layout: the null row is `num_classes`)."""
        if ((self.class_ids < 0) | (self.class_ids >= num_classes))[~self.null_mask].any():
            bad = self.class_ids[~self.null_mask]
            raise ValueError(f"class ids must be in 0..{num_classes - 1}, got {sorted(set(bad.tolist()))}")
        return torch.where(self.null_mask, torch.full_like(self.class_ids, num_classes), self.class_ids)


def as_condition(condition: Condition | torch.Tensor | list[int]) -> Condition:
    """Accept bare class ids where a Condition is expected (the common case in scripts and tests)."""
    return condition if isinstance(condition, Condition) else Condition.classes(condition)


@dataclass
class DecodeState:
    """Where one batch's decoding stands. `tokens` holds a value wherever `filled` (B, L) is True."""

    condition: Condition
    tokens: (
        torch.Tensor
    )  # (B, L) int64 ids, or (B, L, D) float vectors (continuous orders); meaningless where not filled
    filled: torch.Tensor  # (B, L) bool
    step: int = 0  # prediction steps taken so far
    num_steps: int = 0
    cache: Any = None  # the model's KV cache, if the order has one
    extra: dict[str, Any] = field(default_factory=dict)  # order-specific bookkeeping
    # (B, L) commit index of each filled position, for orders that fill positions in an order of the sampler's
    # choosing (random-order): `commit` numbers new positions after the filled ones, and a sampler that rewrites
    # positions (speculative drafts) numbers them itself. None: the order's positions say it (raster).
    rank: torch.Tensor | None = None
    # network passes a row costs beyond the model's own `num_steps`: a second network run inside each step, summed
    # over the steps (MAR's diffusion head, `head_steps` of them an AR step; a step that reveals no token, with more
    # steps than tokens, skips its head); `passes` is what a server caps
    extra_passes: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    def commit(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Write (B, n) values (or (B, n, D) vectors) at (B, n) positions, mark them filled and count the step:
        what every order's `advance` does before its own bookkeeping."""
        index = positions if self.tokens.dim() == 2 else positions[..., None].expand(-1, -1, self.tokens.shape[-1])
        if self.rank is not None:
            count = self.filled.sum(1, keepdim=True)
            self.rank.scatter_(1, positions, count + torch.arange(positions.shape[1], device=count.device))
        self.tokens.scatter_(1, index, values)
        self.filled.scatter_(1, positions, True)
        self.step += 1

    @property
    def passes(self) -> int:
        """Network passes one row costs from start to done: the cost of these options, compared across orders'
        unlike step counts (a masked order's `steps`, MAR's AR steps and head steps)."""
        return self.num_steps + self.extra_passes

    @property
    def progress(self) -> float:
        """Where decoding stands in [0, 1] (0 at the first step, 1 at the last): what guidance schedules read."""
        return self.step / max(self.num_steps - 1, 1)


@dataclass
class Prediction:
    """A step's output: for each sample, the positions (B, n) predicted and either their logits (discrete orders)
    or the head's input z (continuous orders)."""

    positions: torch.Tensor  # (B, n) int64 sequence positions
    logits: torch.Tensor | None = None  # (B, n, V) float32, discrete tokens
    z: torch.Tensor | None = None  # (B, n, D) a head's input, continuous tokens (MAR)


@dataclass
class LossOutput:
    """What an order trains against: the mean loss and how many targets it averaged (the loop's throughput unit)."""

    loss: torch.Tensor  # () scalar
    num_targets: int
    # (B, L) -log p of each target in nats, detached, in the order's target layout (next-scale: scale by scale), where
    # the order has a likelihood: what `argen eval`'s test NLL and held-out bits per scale read
    nll_targets: torch.Tensor | None = None

    @property
    def nll_sum(self) -> torch.Tensor | None:
        """() summed -log p in nats over every target; None where the order has no likelihood."""
        return None if self.nll_targets is None else self.nll_targets.sum()

    @classmethod
    def cross_entropy(cls, logits: torch.Tensor, targets: torch.Tensor, likelihood: bool = True) -> LossOutput:
        """Mean cross-entropy of logits (..., V) against targets (...). `likelihood`: the per-target NLL is the
        sequence's log-likelihood under the order (false for masked training, which scores random subsets)."""
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        n = targets.numel()
        return cls(nll.sum() / n, n, nll.detach().view(targets.shape) if likelihood else None)


@dataclass(frozen=True)
class NoOptions:
    """The sampler options of an order that has none of its own."""


@dataclass(frozen=True)
class OrderSpec:
    """What the sampler, the CLI and the pipeline need to know about an order, declared once on its model class
    (`Model.order`) instead of probed with hasattr/isinstance.

    policy: who chooses the positions of a step: "next" (the model's own next positions: raster, next-scale),
        "masked" (confidence with annealed noise, MaskGIT), "random" (a per-sample permutation, RandAR) or "mar"
        (a per-sample permutation on a cosine schedule, MAR); the random ones live in `argen.sampling` and draw
        from the per-sample generators.
    values: "discrete" (ids; predictions carry logits, tokens are (B, L) int64) or "continuous" (vectors; the
        model has `token_dim`, predictions carry `z`, and `model.head` / `model.head_schedule` are the diffusion
        head the sampler runs, `argen.sampling.diffusion`).
    accelerations: the acceleration strategies that fit the order ("speculative", "parallel").
    options_class: a dataclass of the order's own sampler options, handed to `start` (pruning, mask steps).
    reads_tokenizer: the generator builds its inputs through the tokenizer's codebook (`bind(tokenizer)`).
    row_steps: rows at different steps of their own decoding may share one `predict` (each row's progress is
        read from `filled`, not from `state.step`: raster's next position is its filled prefix's length, the
        masked order predicts the whole canvas, random-order is told each row's positions), and `advance` reads
        only the rows it is given: what lets a server's requests join a running batch mid-way.
    default_sampler: the documented sampler defaults of a freshly trained model of this order (guidance).
    """

    name: str
    policy: str = "next"
    values: str = "discrete"
    accelerations: frozenset[str] = frozenset()
    options_class: type = NoOptions
    reads_tokenizer: bool = False
    row_steps: bool = False
    default_sampler: tuple[tuple[str, Any], ...] = ()


@runtime_checkable
class Generator(Protocol):
    order: ClassVar[OrderSpec]
    num_classes: int
    vocab_size: int
    seq_len: int  # tokens per image

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) of the final token map."""

    def start(self, condition: Condition, options: Any = None) -> DecodeState:
        """Begin decoding for a batch of conditions; `options`: an `order.options_class` instance (None: defaults)."""

    def predict(self, state: DecodeState, positions: torch.Tensor | None = None) -> Prediction:
        """Predictions for (B, n) positions; None = the positions this order generates next."""

    def advance(self, state: DecodeState, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Commit (B, n) values at (B, n) positions and move to the next step."""

    def loss(self, tokens: torch.Tensor, condition: Condition) -> LossOutput:
        """The training loss on (B, L) token sequences ((B, L, D) vectors for a continuous order)."""
