"""Masked generative order: MaskGIT's bidirectional transformer ("MaskGIT: Masked Generative Image Transformer",
Chang et al. 2022; Muse, Chang et al. 2023, for the guidance).

Sequence = [class token, L image tokens]; a token not filled yet reads the [MASK] embedding (id = vocab_size) and
every token attends to every other (no causal mask). Training hides a cosine-schedule fraction of each image and
predicts it (MaskGIT §3.1); decoding predicts the whole canvas at every step and keeps the most confident
predictions, which is the sampler's business (`argen.sampling.masked`, MaskGIT §3.2): the model only fills the
positions it is told.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from argen.errors import ConfigError, check_int, check_number
from argen.models.interface import Condition, DecodeState, LossOutput, OrderSpec, Prediction, as_condition
from argen.models.layers import Linear, RMSNorm
from argen.models.raster import DecoderConfig, TransformerBlock
from argen.models.rope import RopeTable
from argen.pretrained import Pretrained, register

# MaskGIT §3.3: the fraction of tokens still masked as a function of progress t in [0, 1]; 1 at t = 0
# (all masked), 0 at t = 1. Concave schedules (cosine, square) do best; cosine is the paper's choice.
MASK_SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda t: math.cos(math.pi / 2 * t),
    "linear": lambda t: 1.0 - t,
    "square": lambda t: 1.0 - t * t,
}


@dataclass(frozen=True)
class MaskedOptions:
    """Sampler options of the masked order (MaskGIT §3.2)."""

    steps: int = 10  # decoding iterations T; MaskGIT uses 8-12
    choice_temperature: float = 4.5  # scale of the Gumbel noise on the confidences, annealed to 0 at the last step
    mask_schedule: str = "cosine"  # a key of MASK_SCHEDULES: how many tokens stay masked after each step

    def __post_init__(self) -> None:
        check_int(self, "steps")
        check_number(self, "choice_temperature", at_least=0.0)
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ConfigError(
                f"MaskedOptions.mask_schedule {self.mask_schedule!r} unknown; choose from {sorted(MASK_SCHEDULES)}"
            )

    def mask_ratio(self, t: float) -> float:
        """The fraction of the initially masked tokens still masked at progress t in [0, 1]."""
        return MASK_SCHEDULES[self.mask_schedule](t)


@dataclass
class MaskedConfig(DecoderConfig):
    """The raster order's layer-stack fields (`DecoderConfig`, validated there); the masked order adds none: its
    [MASK] row and learned positions follow from vocab_size and grid_size."""


@register
class MaskedTransformer(nn.Module, Pretrained):
    component_type = "masked_transformer"
    config_class = MaskedConfig
    # Muse §2.7 raises the guidance scale over the decoding steps: the first, few tokens set the layout freely.
    order = OrderSpec(
        "masked",
        policy="masked",
        options_class=MaskedOptions,
        row_steps=True,
        # measured on the shipped model (docs/quality.md): confidence-first unmasking narrows variety, which a
        # token temperature above 1 and choice noise buy back; guidance ramped along the steps buys accuracy
        default_sampler=(
            ("cfg_scale", 1.9),
            ("cfg_schedule", "linear"),
            ("temperature", 1.5),
            ("steps", 16),
            ("choice_temperature", 9.0),
        ),
    )

    def __init__(self, config: MaskedConfig):
        super().__init__()
        self.config = c = config
        self.num_classes, self.vocab_size, self.seq_len = c.num_classes, c.vocab_size, c.grid_size**2
        self.mask_id = c.vocab_size  # MaskGIT §3.1: one extra embedding row, [MASK]
        self.tok_embeddings = nn.Embedding(c.vocab_size + 1, c.dim)
        self.cls_embedding = nn.Embedding(c.num_classes + 1, c.dim)  # the last row is the null condition
        # MaskGIT's learned absolute positions: every [MASK] input is the same vector, so without them a hidden
        # slot knows where it is only through the rotary phases of its attention scores.
        self.pos_embedding = nn.Parameter(torch.empty(1 + self.seq_len, c.dim))
        # LlamaGen's pre-norm block, shared with the raster order; without a mask it attends both ways, as
        # MaskGIT's bidirectional transformer does.
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = Linear(c.dim, c.vocab_size, bias=False)
        self.rope = RopeTable(c.grid_size, c.dim // c.num_heads, c.rope_base, num_prefix=1)
        nn.init.normal_(self.pos_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order: the units FSDP shards and activation checkpointing recomputes."""
        return list(self.layers)

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor, condition: Condition | torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) ids, masked: (B, L) bool (True = hidden, read as [MASK]), condition: B classes ->
        logits (B, L, V) in float32 for every image position."""
        if tokens.shape != masked.shape or tokens.shape[1:] != (self.seq_len,):
            raise ValueError(
                f"tokens and mask must be (B, {self.seq_len}), got {tuple(tokens.shape)} and {tuple(masked.shape)}"
            )
        cls = self.cls_embedding(as_condition(condition).embedding_ids(self.num_classes))
        return self._run(cls, tokens, masked)

    def _run(self, cls: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Class embeddings (B, D), ids (B, L), mask (B, L) -> logits (B, L, V) in float32."""
        ids = torch.where(masked, self.mask_id, tokens)
        h = torch.cat([cls[:, None], self.tok_embeddings(ids)], dim=1) + self.pos_embedding  # (B, 1 + L, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope.table, None, None, i, 0)  # no mask, no cache: full bidirectional attention
        return self.output(self.norm(h[:, 1:])).float()  # (B, L, V); the class slot predicts nothing

    def training_mask(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """(B, L) bool, True where a training target is hidden. MaskGIT §3.1: per sample r ~ U(0, 1), then
        ceil(cos(pi/2 r) L) positions (at least one) chosen uniformly at random. Draws from the global RNG."""
        L = self.seq_len
        ratio = torch.cos(math.pi / 2 * torch.rand(batch_size, device=device))  # (B,) in (0, 1]
        count = (ratio * L).ceil().clamp(1, L)  # (B,)
        rank = torch.rand(batch_size, L, device=device).argsort(dim=1).argsort(dim=1)  # a random permutation
        return rank < count[:, None]

    def loss(self, tokens: torch.Tensor, condition: Condition) -> LossOutput:
        """Cross-entropy on the hidden positions of (B, L) tokens only (MaskGIT eq. 1); the condition is dropped
        at the configured rate in training, for classifier-free guidance. The order has no exact likelihood (a
        random subset is predicted from another), so `nll_sum` is None."""
        if self.training:
            condition = condition.dropped(self.config.class_dropout)
        masked = self.training_mask(tokens.shape[0], tokens.device)
        logits = self(tokens, masked, condition)  # (B, L, V)
        return LossOutput.cross_entropy(logits[masked], tokens[masked], likelihood=False)

    # --- the order contract (argen.models.interface): the whole canvas every step ---

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.config.grid_size, self.config.grid_size

    def start(self, condition: Condition | torch.Tensor, options: MaskedOptions | None = None) -> DecodeState:
        """An empty canvas: every position masked; `options.steps` predictions fill it."""
        options = options or MaskedOptions()
        weight = self.tok_embeddings.weight
        condition = as_condition(condition).to(weight.device)
        B = len(condition)
        tokens = torch.zeros((B, self.seq_len), dtype=torch.long, device=weight.device)
        filled = torch.zeros((B, self.seq_len), dtype=torch.bool, device=weight.device)
        extra = {"cls": self.cls_embedding(condition.embedding_ids(self.num_classes))}  # (B, D)
        return DecodeState(condition, tokens, filled, num_steps=options.steps, extra=extra)

    def predict(self, state: DecodeState, positions: torch.Tensor | None = None) -> Prediction:
        """One forward pass over the canvas (unfilled positions read [MASK]) -> logits at (B, n) positions,
        by default all L of them."""
        B = state.tokens.shape[0]
        logits = self._run(state.extra["cls"], state.tokens, ~state.filled)  # (B, L, V)
        if positions is None:
            positions = torch.arange(self.seq_len, device=logits.device).expand(B, -1)
            return Prediction(positions, logits)
        if int(positions.min()) < 0 or int(positions.max()) >= self.seq_len:
            raise ValueError(f"positions {int(positions.min())}..{int(positions.max())} outside 0..{self.seq_len - 1}")
        index = positions[..., None].expand(-1, -1, logits.shape[-1])
        return Prediction(positions, logits.gather(1, index))  # (B, n, V)

    def advance(self, state: DecodeState, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Commit (B, n) values; a position may repeat with its value (the policy pads ragged counts that way)."""
        state.commit(positions, values)


# Presets are data. "mnist-masked" matches the raster order's "mnist-small" (~2 M parameters) on the same tokens.
MASKED_PRESETS: dict[str, MaskedConfig] = {
    "mnist-masked": MaskedConfig(
        vocab_size=512,
        num_classes=10,
        grid_size=7,
        dim=192,
        num_layers=4,
        num_heads=6,
        multiple_of=32,
        class_dropout=0.1,
    ),
}
