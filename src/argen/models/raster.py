"""Raster-order next-token generator: a Llama-style decoder (LlamaGen, Sun et al. 2024).

Sequence = [class token, image tokens in raster order]; logits row t predicts image token t.
Parameter names follow LlamaGen's `gpt.py` (`tok_embeddings`, `cls_embedding.embedding_table`,
`layers.N.attention.wqkv`, `feed_forward.w1/w2/w3`, `norm`, `output`) so its checkpoints load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from argen.errors import ConfigError, check_int, check_number, check_probability
from argen.models.interface import (
    Condition,
    DecodeState,
    LossOutput,
    NoOptions,
    OrderSpec,
    Prediction,
    as_condition,
)
from argen.models.kv_cache import KVCache
from argen.models.layers import (
    FeedForward,
    Linear,
    RMSNorm,
    attention,
    fewest_exact_keys,
    init_normal,
    replace_randomly,
    swiglu_hidden_dim,
)
from argen.models.rope import RopeTable, apply_rope
from argen.pretrained import Pretrained, register


@dataclass
class DecoderConfig:
    """The fields of the Llama-style layer stack below (`TransformerBlock`), shared by the orders built on it
    (raster here, random-order and masked in their files); each order's config extends it."""

    vocab_size: int = 16384
    num_classes: int = 1000
    grid_size: int = 16  # tokens per side; seq_len = grid_size**2
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # grouped-query attention when < num_heads
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    class_dropout: float = 0.1  # label -> null class in training, for classifier-free guidance
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0

    def __post_init__(self) -> None:
        config = type(self).__name__
        check_int(self, "vocab_size", minimum=2)
        for name in ("num_classes", "grid_size", "dim", "num_layers", "num_heads", "multiple_of"):
            check_int(self, name)
        check_int(self, "num_kv_heads", optional=True)
        check_number(self, "ffn_dim_multiplier", above=0, optional=True)
        check_number(self, "rope_base", above=0)
        check_number(self, "norm_eps", above=0)
        for name in ("class_dropout", "resid_dropout", "ffn_dropout"):
            check_probability(self, name)
        if self.dim % self.num_heads:
            raise ConfigError(f"{config}: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 4:
            raise ConfigError(
                f"{config}: head width dim / num_heads = {self.dim // self.num_heads} must be a multiple of 4 "
                "(2D rotary embedding)"
            )
        if self.num_heads % (self.num_kv_heads or self.num_heads):
            raise ConfigError(
                f"{config}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @staticmethod
    def data_fields(seq_len: int, tokenizer: Any | None) -> dict[str, Any]:
        """The fields the training data fixes: the token grid of a square image."""
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            raise ConfigError(f"{seq_len} tokens per image is not a square grid")
        return {"grid_size": side}


@dataclass
class RasterConfig(DecoderConfig):
    token_dropout: float = 0.0
    input_noise: float = 0.0  # rate of random codes among the teacher-forced inputs (`replace_randomly`)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability(self, "token_dropout")
        check_probability(self, "input_noise")


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads or c.num_heads
        self.head_dim = c.dim // c.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.wqkv = Linear(c.dim, c.dim + 2 * kv_dim, bias=False)
        self.wo = Linear(c.dim, c.dim, bias=False)
        self.resid_dropout = nn.Dropout(c.resid_dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        """`start`: the first of T consecutive positions, or a (B, T) tensor of positions per row (then the
        (B, 1, T, S) mask says which of the first S cache entries each query sees)."""
        B, T, D = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        qkv = self.wqkv(x)
        heads = self.num_heads + self.num_kv_heads  # queries and keys rotated together: one kernel
        qk = apply_rope(qkv[..., : D + kv_dim].view(B, T, heads, self.head_dim), rope)
        q, k = (t.transpose(1, 2) for t in qk.split([self.num_heads, self.num_kv_heads], dim=2))  # (B, H, T, hd)
        v = qkv[..., D + kv_dim :].view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and isinstance(start, torch.Tensor):
            k, v = cache.update_rows(layer, k, v, start, mask.shape[-1])  # (B, Hkv, S, hd)
        elif cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, Hkv, start+T, hd)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = attention(q, k, v, mask)  # (B, H, T, hd)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, D)))


class TransformerBlock(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.attention = Attention(c)
        hidden = swiglu_hidden_dim(c.dim, c.multiple_of, c.ffn_dim_multiplier)
        self.feed_forward = FeedForward(c.dim, hidden, c.ffn_dropout)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x, rope, mask, cache, layer, start):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, layer, start)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embeddings with one extra row, the null class used for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


@register
class RasterTransformer(nn.Module, Pretrained):
    component_type = "raster_transformer"
    config_class = RasterConfig
    order = OrderSpec(
        "raster",
        accelerations=frozenset({"speculative", "parallel"}),
        row_steps=True,
        default_sampler=(("cfg_scale", 2.0),),
    )

    def __init__(self, config: RasterConfig):
        super().__init__()
        self.config = c = config
        self.num_classes = c.num_classes
        self.vocab_size = c.vocab_size
        self.seq_len = c.grid_size**2
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.cls_embedding = LabelEmbedder(c.num_classes, c.dim)
        self.tok_dropout = nn.Dropout(c.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = Linear(c.dim, c.vocab_size, bias=False)
        # Derived from the config, so not part of a checkpoint.
        self.rope = RopeTable(c.grid_size, c.dim // c.num_heads, c.rope_base, num_prefix=1)
        self.apply(init_normal)

    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order: the units FSDP shards and activation checkpointing recomputes."""
        return list(self.layers)

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """Embedded inputs (B, T, D) at positions start..start+T, every earlier position cached -> logits (B, T, V)
        in float32."""
        T = x.shape[1]
        rope = self.rope[start : start + T]
        pos_q = torch.arange(start, start + T, device=x.device)
        pos_k = torch.arange(start + T, device=x.device)
        mask = pos_k[None, :] <= pos_q[:, None]  # (T, start+T) causal
        if cache is not None:
            cache.written[:, start : start + T] = True
        return self._layers(x, rope, mask, cache, start)

    def _run_own(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embedded inputs (B, T, D) at each row's own next positions (B, T), every earlier position of its row
        cached -> logits (B, T, V). A row's logits are the same alone or beside rows at other steps (a server's
        requests that join a running batch mid-way), and rows at different steps share the pass: every row
        attends over the same keys with a causal key mask, whatever the other rows' positions. Those are the
        whole cache (seq_len entries), or only the cache's blocks up to the furthest row's position where the
        attention kernel rounds the same without the masked rest (CPU bfloat16 inference: ~144 of 256 keys read
        per step on average)."""
        cache.written.scatter_(1, positions, True)
        # whole buffers (no copy before the matmul), never fewer keys than are exact: all of them outside bfloat16
        fewest = fewest_exact_keys(x, positions.shape[1], cache.max_len)
        length = cache.block_length(max(int(positions.max()) + 1, fewest))
        keys = torch.arange(length, device=x.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, length)
        return self._layers(x, self.rope[positions], mask, cache, positions)

    def _run_rows(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embedded inputs (B, T, D) at per-row positions (B, T) -> logits (B, T, V). Each query sees the cache
        entries of its row written so far, up to its own position: holes (positions decoded out of order) and
        stale entries after it are masked."""
        cache.written.scatter_(1, positions, True)
        S = int(positions.max()) + 1
        pos_k = torch.arange(S, device=x.device)
        causal = pos_k[None, None, :] <= positions[:, :, None]  # (B, T, S)
        mask = (causal & cache.written[:, None, :S])[:, None]  # (B, 1, T, S)
        return self._layers(x, self.rope[positions], mask, cache, positions)

    def _layers(self, x, rope, mask, cache: KVCache | None, start: int | torch.Tensor) -> torch.Tensor:
        """The layer stack and head: embedded inputs (B, T, D) -> logits (B, T, V) in float32."""
        h = self.tok_dropout(x)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, i, start)
        return self.output(self.norm(h)).float()

    def forward(self, ids: torch.Tensor, condition: Condition | torch.Tensor) -> torch.Tensor:
        """Teacher forcing. ids: (B, T) image tokens, T <= seq_len - 1; condition: B classes. -> (B, T+1, V):
        row t predicts image token t."""
        if ids.dim() != 2 or ids.shape[1] > self.seq_len - 1:
            raise ValueError(f"ids must be (B, T) with T <= {self.seq_len - 1}, got {tuple(ids.shape)}")
        cls = self.cls_embedding(as_condition(condition).embedding_ids(self.num_classes))[:, None]  # (B, 1, D)
        x = torch.cat([cls, self.tok_embeddings(ids)], dim=1)  # (B, T+1, D)
        return self._run(x, 0, None)

    def loss(self, tokens: torch.Tensor, condition: Condition) -> LossOutput:
        """Next-token cross-entropy over every position (B, L); the condition is dropped at the configured rate
        in training, for classifier-free guidance."""
        inputs = tokens[:, :-1]
        if self.training:
            condition = condition.dropped(self.config.class_dropout)
            inputs = replace_randomly(inputs, self.config.input_noise, self.config.vocab_size)
        logits = self(inputs, condition)  # (B, L, V)
        return LossOutput.cross_entropy(logits, tokens)

    # --- the order contract (argen.models.interface) ---

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.config.grid_size, self.config.grid_size

    def start(self, condition: Condition | torch.Tensor, options: NoOptions | None = None) -> DecodeState:
        condition = as_condition(condition)
        B = len(condition)
        head_dim = self.config.dim // self.config.num_heads
        num_kv = self.config.num_kv_heads or self.config.num_heads
        weight = self.tok_embeddings.weight
        cache = KVCache(len(self.layers), B, num_kv, head_dim, self.seq_len, like=weight)
        tokens = torch.zeros((B, self.seq_len), dtype=torch.long, device=weight.device)
        filled = torch.zeros((B, self.seq_len), dtype=torch.bool, device=weight.device)
        extra = {"cls": self.cls_embedding(condition.to(weight.device).embedding_ids(self.num_classes))}
        return DecodeState(condition, tokens, filled, num_steps=self.seq_len, cache=cache, extra=extra)

    def predict(self, state: DecodeState, positions: torch.Tensor | None = None) -> Prediction:
        """Logits for (B, n) positions, by default the next one. Position p reads the class token (p = 0) or the
        token at p - 1; where p - 1 is not filled yet (parallel decoding starts a row early) it reads the nearest
        filled token before p. One forward pass however far apart the rows' positions are."""
        own = positions is None
        if own:
            # each row's own next position: raster fills a prefix, so rows of requests that joined a running
            # batch at different steps each continue where they stand
            positions = state.filled.sum(dim=1, keepdim=True)
            if int(positions.max()) >= self.seq_len:
                raise ValueError("decoding is finished: all tokens are chosen")
        if int(positions.min()) < 0 or int(positions.max()) >= self.seq_len:
            raise ValueError(f"positions {int(positions.min())}..{int(positions.max())} outside 0..{self.seq_len - 1}")
        B = state.tokens.shape[0]
        index = torch.arange(self.seq_len, device=positions.device).expand(B, -1)
        last_filled = torch.where(state.filled, index, -1).cummax(dim=1).values  # (B, L) last filled index <= i
        before = last_filled.gather(1, (positions - 1).clamp(min=0))  # (B, n)
        x = self.tok_embeddings(state.tokens.gather(1, before.clamp(min=0)))  # (B, n, D)
        x = torch.where((positions == 0)[..., None], state.extra["cls"][:, None].expand_as(x), x)
        first = positions[:1, :1]
        contiguous = torch.arange(positions.shape[1], device=positions.device) + first
        if own:
            logits = self._run_own(x, positions, state.cache)
        elif bool((positions == contiguous).all()) and bool(state.cache.written[:, : int(first)].all()):
            # every row at the same consecutive positions after a complete prefix: plain slices
            logits = self._run(x, int(first), state.cache)
        else:
            logits = self._run_rows(x, positions, state.cache)
        return Prediction(positions, logits)  # logits (B, n, V)

    def advance(self, state: DecodeState, positions: torch.Tensor, values: torch.Tensor) -> None:
        state.commit(positions, values)


# Presets are data. "mnist-small" is the shipped default; the GPT-* rows are LlamaGen's c2i sizes at 256x256.
RASTER_PRESETS: dict[str, RasterConfig] = {
    "mnist-small": RasterConfig(
        vocab_size=512,
        num_classes=10,
        grid_size=7,
        dim=192,
        num_layers=4,
        num_heads=6,
        multiple_of=32,
        class_dropout=0.1,
    ),
    "GPT-B": RasterConfig(dim=768, num_layers=12, num_heads=12),
    "GPT-L": RasterConfig(dim=1024, num_layers=24, num_heads=16),
    "GPT-XL": RasterConfig(dim=1280, num_layers=36, num_heads=20),
    "GPT-XXL": RasterConfig(dim=1536, num_layers=48, num_heads=24),
}
