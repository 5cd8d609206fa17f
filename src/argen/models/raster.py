"""Raster-order next-token generator: a Llama-style decoder (LlamaGen, Sun et al. 2024).

Sequence = [class token, image tokens in raster order]; logits row t predicts image token t.
Parameter names follow LlamaGen's `gpt.py` (`tok_embeddings`, `cls_embedding.embedding_table`,
`layers.N.attention.wqkv`, `feed_forward.w1/w2/w3`, `norm`, `output`) so its checkpoints load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from argen.errors import ConfigError, check_int, check_number, check_probability
from argen.models.interface import DecodeState
from argen.models.kv_cache import KVCache
from argen.models.layers import FeedForward, RMSNorm, attention, drop_labels, swiglu_hidden_dim
from argen.models.rope import apply_rope, rope_2d_table
from argen.pretrained import Pretrained, register


@dataclass
class RasterConfig:
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
    token_dropout: float = 0.0
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int(self, "vocab_size", minimum=2)
        for name in ("num_classes", "grid_size", "dim", "num_layers", "num_heads", "multiple_of"):
            check_int(self, name)
        check_int(self, "num_kv_heads", optional=True)
        check_number(self, "ffn_dim_multiplier", above=0, optional=True)
        check_number(self, "rope_base", above=0)
        check_number(self, "norm_eps", above=0)
        for name in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout"):
            check_probability(self, name)
        if self.dim % self.num_heads:
            raise ConfigError(f"RasterConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 4:
            raise ConfigError(
                f"RasterConfig: head width dim / num_heads = {self.dim // self.num_heads} must be a multiple of 4 "
                "(2D rotary embedding)"
            )
        if self.num_heads % (self.num_kv_heads or self.num_heads):
            raise ConfigError(
                f"RasterConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )


class Attention(nn.Module):
    def __init__(self, c: RasterConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads or c.num_heads
        self.head_dim = c.dim // c.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.wqkv = nn.Linear(c.dim, c.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
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
        """`start`: the first of T consecutive positions, a (T,) tensor of arbitrary positions, or a (B, T) tensor
        of positions per row."""
        B, T, D = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([D, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.num_heads, self.head_dim), rope).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rope(k.view(B, T, self.num_kv_heads, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and isinstance(start, torch.Tensor) and start.dim() == 2:
            k, v = cache.update_rows(layer, k, v, start)  # (B, Hkv, max position + 1, hd)
        elif cache is not None and isinstance(start, torch.Tensor):
            k, v = cache.update_at(layer, k, v, start)  # (B, Hkv, max position + 1, hd)
        elif cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, Hkv, start+T, hd)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = attention(q, k, v, mask)  # (B, H, T, hd)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, D)))


class TransformerBlock(nn.Module):
    def __init__(self, c: RasterConfig):
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
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        # Derived from the config, so not part of a checkpoint.
        table = rope_2d_table(c.grid_size, c.dim // c.num_heads, c.rope_base, num_prefix=1)
        self.register_buffer("rope", table, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Training-time label dropout for classifier-free guidance (identity in eval mode)."""
        return drop_labels(labels, self.num_classes, self.config.class_dropout) if self.training else labels

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """Embedded inputs (B, T, D) at positions start..start+T -> logits (B, T, V) in float32."""
        T = x.shape[1]
        rope = self.rope[start : start + T]
        pos_q = torch.arange(start, start + T, device=x.device)
        pos_k = torch.arange(start + T, device=x.device)
        mask = pos_k[None, :] <= pos_q[:, None]  # (T, start+T) causal
        return self._layers(x, rope, mask, cache, start)

    def _layers(self, x, rope, mask, cache: KVCache | None, start: int | torch.Tensor) -> torch.Tensor:
        """The layer stack and head: embedded inputs (B, T, D) -> logits (B, T, V) in float32."""
        h = self.tok_dropout(x)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, i, start)
        return self.output(self.norm(h)).float()

    def _run_at(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embedded inputs (B, T, D) at arbitrary positions (T,) -> logits (B, T, V). Each query sees the filled
        cache positions up to its own (the others are not known yet)."""
        cache.filled[positions] = True
        pos_k = torch.arange(int(positions.max()) + 1, device=x.device)
        mask = cache.filled[: len(pos_k)][None, :] & (pos_k[None, :] <= positions[:, None])  # (T, S)
        return self._layers(x, self.rope[positions], mask, cache, positions)

    def _run_rows(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embedded inputs (B, T, D) at per-row positions (B, T) -> logits (B, T, V). Each query sees the cache
        positions up to its own, which the caller keeps valid for its row."""
        pos_k = torch.arange(int(positions.max()) + 1, device=x.device)
        mask = (pos_k[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        return self._layers(x, self.rope[positions], mask, cache, positions)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. ids: (B, T) image tokens, T <= seq_len - 1; labels: (B,). -> (B, T+1, V)."""
        if ids.dim() != 2 or ids.shape[1] > self.seq_len - 1:
            raise ValueError(f"ids must be (B, T) with T <= {self.seq_len - 1}, got {tuple(ids.shape)}")
        cls = self.cls_embedding(self.drop_labels(labels))[:, None]  # (B, 1, D)
        x = torch.cat([cls, self.tok_embeddings(ids)], dim=1)  # (B, T+1, D)
        return self._run(x, 0, None)

    def training_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing input for full sequences (B, seq_len): every token but the last."""
        return tokens[:, :-1]

    # --- the step interface (argen.models.interface.Generator) ---

    def start(self, labels: torch.Tensor) -> DecodeState:
        B = labels.shape[0]
        head_dim = self.config.dim // self.config.num_heads
        num_kv = self.config.num_kv_heads or self.config.num_heads
        weight = self.tok_embeddings.weight
        cache = KVCache(len(self.layers), B, num_kv, head_dim, self.seq_len + 1, like=weight)
        tokens = torch.full((B, self.seq_len), -1, dtype=torch.long, device=weight.device)
        return DecodeState(labels=labels, tokens=tokens, num_steps=self.seq_len, cache=cache)

    def predict(self, state: DecodeState) -> torch.Tensor:
        if state.done:
            raise ValueError("decoding is finished: all tokens are chosen")
        if state.step == 0:
            x = self.cls_embedding(state.labels)[:, None]  # prefill: the class token at position 0
        else:
            x = self.tok_embeddings(state.tokens[:, state.step - 1 : state.step])
        logits = self._run(x, state.step, state.cache)
        state.cache.length = state.step + 1
        state.span = (state.step, state.step + 1)
        return logits  # (B, 1, V)

    def advance(self, state: DecodeState, ids: torch.Tensor) -> None:
        state.tokens[:, state.step : state.step + 1] = ids
        state.step += 1

    # --- speculative steps: rows check drafted blocks at their own positions in one pass ---

    def predict_rows(self, state: DecodeState, starts: torch.Tensor, length: int) -> torch.Tensor:
        """Logits (B, length, V) for positions starts[b]..starts[b]+length-1 of every row b, each fed with the row's
        `state.tokens` before it (the class token at position 0): one forward pass however far apart the rows
        are. The caller writes drafted tokens into `state.tokens` first and keeps each row's cache valid below
        starts[b] (entries at and after it are rewritten)."""
        if int(starts.min()) < 0 or int(starts.max()) + length > self.seq_len:
            raise ValueError(
                f"positions {int(starts.min())}..{int(starts.max()) + length - 1} outside 0..{self.seq_len - 1}"
            )
        positions = starts[:, None] + torch.arange(length, device=starts.device)  # (B, T)
        previous = state.tokens.gather(1, (positions - 1).clamp(min=0)).clamp(min=0)  # unknown (-1): any id
        x = self.tok_embeddings(previous)
        cls = self.cls_embedding(state.labels)[:, None].expand_as(x)
        x = torch.where((positions == 0)[..., None], cls, x)
        if bool((starts == starts[0]).all()):  # rows in step (one sample and its guidance row): plain slices
            return self._run(x, int(starts[0]), state.cache)
        return self._run_rows(x, positions, state.cache)

    # --- parallel decoding: positions out of order ---

    def predict_at(self, state: DecodeState, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Parallel decoding: logits (B, n, V) for the tokens at sequence indices `targets` (n,), each fed with the
        token `inputs` (B, n) standing before it (ignored for target 0, which reads the class token)."""
        embedded = self.tok_embeddings(inputs.clamp(min=0))  # (B, n, D)
        cls = self.cls_embedding(state.labels)[:, None].expand_as(embedded)
        x = torch.where((targets == 0)[None, :, None], cls, embedded)
        state.span = (int(targets.min()), int(targets.max()) + 1)
        return self._run_at(x, targets, state.cache)


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
