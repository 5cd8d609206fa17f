"""Random-order generator: a decoder-only transformer trained on random permutations (RandAR: Pang et al. 2024,
"Decoder-only Autoregressive Visual Generation in Random Orders", arXiv 2412.01827).

RandAR's key design: before each image token the decoder reads a *position instruction* token saying which position
comes next, so any order can be trained and sampled, raster included. For a permutation o of the L positions
the training sequence is

    [cls, q(o_1), t(o_1), q(o_2), t(o_2), ..., t(o_{L-1}), q(o_L)]

with t(p) = token embedding + position embedding of p, and q(p) = the shared instruction embedding + position
embedding of p; both also carry the 2D rotary embedding of p (LlamaGen's table, as RandAR). The output at q(o_k)
predicts the token at o_k. Mask: q(o_k) sees cls and t(o_1..o_{k-1}); t(o_k) sees cls and t(o_1..o_k); no entry
ever sees a query. So queries are never cached: the KV cache holds cls and the filled tokens only, the token
committed k-th sitting in slot k, whatever its position. A decoding pass feeds the tokens committed since the
last pass plus the next n queries; with n = 1 that is teacher forcing exactly, with n > 1 the queries of a pass
do not see each other (RandAR's parallel decoding with KV cache: ~2.5x fewer steps at equal FID).

The order itself (which permutation, how many positions per step) is drawn in `argen.sampling.random_order`,
from the per-sample generators. Speculative decoding (`argen.sampling.speculative`) checks a drafted block along
each sample's permutation in one pass: queries at drafted (filled) positions see only the tokens committed before
them, and the cache notices which drafts were not accepted (see `_pending`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from argen.errors import ConfigError, check_int
from argen.models.interface import Condition, DecodeState, LossOutput, OrderSpec, Prediction, as_condition
from argen.models.kv_cache import KVCache
from argen.models.layers import Linear, RMSNorm, init_normal
from argen.models.raster import RASTER_PRESETS, DecoderConfig, LabelEmbedder, TransformerBlock
from argen.models.rope import RopeTable
from argen.pretrained import Pretrained, register


@dataclass(frozen=True)
class RandomOrderOptions:
    """Random-order sampler options.

    steps: decoding passes per image; None = one token per step (seq_len passes). Fewer steps decode several
        positions per pass (RandAR's parallel decoding, lossy); how many per step follows
        `argen.sampling.random_order.tokens_per_step` (a cosine schedule: few at first, more later).
    order: "random" (a per-sample permutation drawn from its seed) or "raster" (the identity permutation).
    """

    steps: int | None = None
    order: str = "random"

    def __post_init__(self) -> None:
        check_int(self, "steps", optional=True)
        if self.order not in ("random", "raster"):
            raise ConfigError(f"RandomOrderOptions.order must be 'random' or 'raster', got {self.order!r}")


@dataclass
class RandomOrderConfig(DecoderConfig):
    """Raster's layer stack and fields (`DecoderConfig`); what differs is the input sequence and the mask."""


def teacher_forcing_mask(seq_len: int) -> torch.Tensor:
    """(2L, 2L) bool, True = may attend, over [cls, q(o_1), t(o_1), ..., t(o_{L-1}), q(o_L)] (RandAR's
    position instruction tokens).

    Each entry has a rank: 0 for cls, k for q(o_k) and t(o_k). A key is visible if it is not a query and its rank
    is at most the entry's limit: k for t(o_k) (itself included), k - 1 for q(o_k) (never its own token).
    Decoding uses the same rule with cache slots as ranks (`RandomOrderTransformer.predict`).
    """
    index = torch.arange(2 * seq_len)
    rank = (index + 1) // 2  # (2L,)
    is_query = index % 2 == 1
    limit = rank - is_query.long()
    return (~is_query)[None, :] & (rank[None, :] <= limit[:, None])


@register
class RandomOrderTransformer(nn.Module, Pretrained):
    component_type = "random_order_transformer"
    config_class = RandomOrderConfig
    # guidance ramped from 1 at the first token to 2.4 at the last and a token temperature of 1.1, as measured on
    # the shipped model (docs/quality.md): guiding the first tokens costs variety, guiding the later ones buys
    # accuracy cheaply, and the temperature buys back the variety the guidance takes
    order = OrderSpec(
        "random-order",
        policy="random",
        accelerations=frozenset({"speculative"}),
        options_class=RandomOrderOptions,
        row_steps=True,
        default_sampler=(("cfg_scale", 2.4), ("cfg_schedule", "linear"), ("temperature", 1.1)),
    )

    def __init__(self, config: RandomOrderConfig):
        super().__init__()
        self.config = c = config
        self.num_classes = c.num_classes
        self.vocab_size = c.vocab_size
        self.seq_len = c.grid_size**2
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embeddings = nn.Embedding(self.seq_len, c.dim)
        # RandAR: one learned position-instruction embedding shared by every position; the position
        # embedding and rotary embedding of the target position make q(p) say "p is next".
        self.query_embedding = nn.Parameter(torch.zeros(c.dim))
        self.cls_embedding = LabelEmbedder(c.num_classes, c.dim)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = Linear(c.dim, c.vocab_size, bias=False)
        # Row 0: cls (all zero, as LlamaGen); row 1 + p: image position p. Derived from the config, not saved.
        self.rope = RopeTable(c.grid_size, c.dim // c.num_heads, c.rope_base, num_prefix=1)
        self.apply(init_normal)
        nn.init.normal_(self.query_embedding, std=0.02)

    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order: the units FSDP shards and activation checkpointing recomputes."""
        return list(self.layers)

    def _token_entries(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """t(p): tokens (B, L) read at positions (B, n) -> (B, n, D)."""
        return self.tok_embeddings(tokens.gather(1, positions)) + self.pos_embeddings(positions)

    def _query_entries(self, positions: torch.Tensor) -> torch.Tensor:
        """q(p): positions (B, n) -> (B, n, D)."""
        return self.query_embedding + self.pos_embeddings(positions)

    def _cls(self, condition: Condition) -> torch.Tensor:
        return self.cls_embedding(condition.embedding_ids(self.num_classes))  # (B, D)

    def _layers(self, x, rope_rows, mask, cache: KVCache | None, slots: torch.Tensor | int) -> torch.Tensor:
        """Entries (B, T, D) with rope rows (B, T) -> logits (B, T, V) in float32; with a cache, entry (b, i) is
        written at slot slots[b, i]."""
        h, rope = x, self.rope[rope_rows]  # (B, T, hd/2, 2)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, i, slots)
        return self.output(self.norm(h)).float()

    def forward(self, tokens: torch.Tensor, condition: Condition | torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Teacher forcing along a permutation. tokens: (B, L); order: (B, L) or (L,) a permutation of 0..L-1 per
        sample -> logits (B, L, V): row k predicts tokens[b, order[b, k]]."""
        B, L = tokens.shape
        if L != self.seq_len:
            raise ValueError(f"tokens must be (B, {self.seq_len}), got {tuple(tokens.shape)}")
        order = order.to(tokens.device).expand(B, L)
        if not torch.equal(order.sort(dim=1).values, torch.arange(L, device=order.device).expand(B, L)):
            raise ValueError("order must be a permutation of 0..L-1 in every row")
        cls = self._cls(as_condition(condition).to(tokens.device))[:, None]  # (B, 1, D)
        q, t = self._query_entries(order), self._token_entries(tokens, order[:, :-1])  # (B, L, D), (B, L-1, D)
        pairs = torch.stack([q[:, :-1], t], dim=2).flatten(1, 2)  # (B, 2L-2, D): q(o_1), t(o_1), ...
        x = torch.cat([cls, pairs, q[:, -1:]], dim=1)  # (B, 2L, D)
        rope_rows = F.pad((1 + order).repeat_interleave(2, dim=1)[:, :-1], (1, 0))  # (B, 2L): 0 for cls
        mask = teacher_forcing_mask(L).to(tokens.device)
        return self._layers(x, rope_rows, mask, None, 0)[:, 1::2]  # the L queries

    def loss(self, tokens: torch.Tensor, condition: Condition) -> LossOutput:
        """Cross-entropy over all L positions (B, L) along a fresh uniform permutation per sample (RandAR's
        training);
        its sum is the exact -log p of the tokens in that order. The condition is dropped at the configured rate
        in training, for classifier-free guidance."""
        if self.training:
            condition = condition.dropped(self.config.class_dropout)
        order = torch.rand(tokens.shape, device=tokens.device).argsort(dim=1)  # (B, L)
        logits = self(tokens, condition, order)  # (B, L, V)
        return LossOutput.cross_entropy(logits, tokens.gather(1, order))

    # --- the order contract (argen.models.interface) ---

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.config.grid_size, self.config.grid_size

    def start(self, condition: Condition | torch.Tensor, options: RandomOrderOptions | None = None) -> DecodeState:
        """Begin decoding; `options.steps` passes in all (default: one per token)."""
        options = options or RandomOrderOptions()
        L = self.seq_len
        steps = options.steps or L
        if steps > L:
            raise ConfigError(f"steps={steps} is more than the {L} tokens of an image: at most {L} (one per step)")
        condition = as_condition(condition)
        B = len(condition)
        weight = self.tok_embeddings.weight
        # Slots 0..L: cls and the tokens in commit order; slot L + 1 takes the padding of uneven rows.
        num_kv = self.config.num_kv_heads or self.config.num_heads
        cache = KVCache(len(self.layers), B, num_kv, self.config.dim // self.config.num_heads, L + 2, like=weight)
        tokens = torch.zeros((B, L), dtype=torch.long, device=weight.device)
        none = torch.full((B, L + 1), -1, dtype=torch.long, device=weight.device)  # column L: a write-off
        extra = {
            "cls": self._cls(condition.to(weight.device)),  # (B, D), cached by the first pass
            "cls_cached": torch.zeros(B, dtype=torch.bool, device=weight.device),  # (B,) per row: rows may join late
            # What the cache holds at slot 1 + r: the position and token committed r-th when it was computed. A
            # slot is valid while it and every slot below still match the state (a speculative sampler rewrites
            # drafts it did not accept).
            "slot_position": none,
            "slot_token": none.clone(),
        }
        filled = torch.zeros_like(tokens, dtype=torch.bool)
        rank = torch.zeros_like(tokens)  # its slot - 1
        return DecodeState(condition, tokens, filled, num_steps=steps, cache=cache, extra=extra, rank=rank)

    def _pending(self, state: DecodeState) -> torch.Tensor:
        """(B, L) filled positions whose t(p) the cache lacks: those from the first rank (in commit order) whose
        slot no longer holds this position with this token, on."""
        B, L = state.tokens.shape
        rank, filled = state.rank, state.filled
        at_rank = torch.full((B, L + 1), -1, dtype=torch.long, device=rank.device)  # position committed r-th
        at_rank.scatter_(1, torch.where(filled, rank, L), torch.arange(L, device=rank.device).expand(B, L))
        at_rank = at_rank[:, :L]
        token_at_rank = torch.where(at_rank >= 0, state.tokens.gather(1, at_rank.clamp(min=0)), -1)
        match = (at_rank >= 0) & (state.extra["slot_position"][:, :L] == at_rank)
        match &= state.extra["slot_token"][:, :L] == token_at_rank
        valid = match.long().cumprod(1).sum(1, keepdim=True)  # (B, 1) leading ranks whose slots hold them
        return filled & (rank >= valid)

    def predict(self, state: DecodeState, positions: torch.Tensor | None = None) -> Prediction:
        """Logits (B, n, V) for the queries at positions (B, n), each row its own positions.

        One pass: the tokens committed since the last pass (their t(p) at slot 1 + rank) and the n queries
        (at slots after them, masked for everyone and overwritten later). A query at an unfilled position sees
        cls and every filled token; the queries of one pass do not see each other (RandAR's parallel decoding).
        A query at a filled position sees the tokens committed before it: teacher forcing along the commit
        order, which is how a speculative sampler checks a drafted block in one pass. Rows may stand at
        different steps (a server's requests joining mid-way): each caches cls in its own first pass, and every
        entry attends over the whole cache with a key mask, so a row's logits do not depend on its neighbours."""
        if positions is None:
            raise ValueError(
                "the random order has no positions of its own: pass positions (B, n), e.g. from "
                "argen.sampling.random_order.RandomOrderPolicy"
            )
        B, L = state.tokens.shape
        if positions.dim() != 2 or positions.shape[0] != B:
            raise ValueError(f"positions must be (B, n) with B = {B}, got {tuple(positions.shape)}")
        if int(positions.min()) < 0 or int(positions.max()) >= L:
            raise ValueError(f"positions {int(positions.min())}..{int(positions.max())} outside 0..{L - 1}")
        pending = self._pending(state)  # (B, L)
        m = int(pending.sum(1).max())
        rank = state.rank
        new = torch.where(pending, rank, L).argsort(dim=1, stable=True)[:, :m]  # (B, m) pending, commit order
        real = pending.gather(1, new)  # (B, m) False where a row has fewer pending tokens: padding
        filled = state.filled.sum(1, keepdim=True)  # (B, 1)
        n = positions.shape[1]
        # Per entry: its slot, the highest slot it may see (the same rule as teacher_forcing_mask), its rope row.
        token_slot = torch.where(real, 1 + rank.gather(1, new), L + 1)
        # Queries are never cached: their slots (past every filled one; drafts may fill the block) are scratch.
        slots = [token_slot, (filled + 1 + torch.arange(n, device=filled.device)).clamp(max=L + 1)]
        asked_filled = state.filled.gather(1, positions)
        limits = [torch.where(real, token_slot, 0), torch.where(asked_filled, rank.gather(1, positions), filled)]
        rope_rows = [torch.where(real, 1 + new, 0), 1 + positions]
        x = [self._token_entries(state.tokens, new), self._query_entries(positions)]
        first = ~state.extra["cls_cached"][:, None]  # (B, 1)
        if bool(first.any()):  # cls at slot 0 where a row's first pass; elsewhere padding, seen by no one
            zero = torch.zeros_like(filled)
            slots, limits, rope_rows = [torch.where(first, 0, L + 1), *slots], [zero, *limits], [zero, *rope_rows]
            x = [state.extra["cls"][:, None], *x]
        slots, limits, rope_rows, x = (torch.cat(parts, dim=1) for parts in (slots, limits, rope_rows, x))
        keys = torch.arange(state.cache.max_len, device=slots.device)
        mask = (keys[None, None, :] <= limits[:, :, None])[:, None]  # (B, 1, T, L + 2)
        logits = self._layers(x, rope_rows, mask, state.cache, slots)[:, -n:]  # (B, n, V)
        written = torch.where(real, rank.gather(1, new), L)  # (B, m) the ranks cached now; padding: column L
        state.extra["slot_position"].scatter_(1, written, new)
        state.extra["slot_token"].scatter_(1, written, state.tokens.gather(1, new))
        state.extra["cls_cached"].fill_(True)
        return Prediction(positions, logits)

    def advance(self, state: DecodeState, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Commit (B, n) values at (B, n) positions; the next pass caches them in this order."""
        if state.filled.gather(1, positions).any():
            raise ValueError("advance commits a position that is already filled")
        state.commit(positions, values)  # numbers them after the filled ones: their rank


def _sized_like(config: DecoderConfig) -> RandomOrderConfig:
    """A raster preset's size and training fields as a random-order config: the two orders compared at equal size."""
    return RandomOrderConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(DecoderConfig)})


# Presets are data. "mnist-random-order" has raster's mnist-small size (~2 M parameters, vocab 512, 10 classes,
# 7 x 7 tokens).
RANDOM_ORDER_PRESETS: dict[str, RandomOrderConfig] = {
    "mnist-random-order": _sized_like(RASTER_PRESETS["mnist-small"]),
}
