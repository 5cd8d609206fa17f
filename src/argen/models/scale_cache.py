"""The next-scale order's KV cache: per-layer entries that grow one token map at a time and may be thinned.

Unlike the raster cache (`kv_cache.KVCache`, one slot per position), entries here need not line up with
positions, because two accelerations leave layers holding different subsets:

- FastVAR-style pruning writes keys only for the tokens a layer actually ran;
- a ScaleKV-style budget ("Memory-Efficient Visual Autoregressive Modeling with Scale-Aware KV Cache
  Compression", Li et al. 2025) keeps, after each scale, only the entries the newest token map attended to
  most. Layers whose attention is spread widest ("drafters") keep everything; the rest ("refiners") keep
  `budget` entries.

Block-causal next-scale decoding needs no mask step by step and its positions are absolute embeddings added
to the inputs, so the order of entries inside a layer does not matter and dropping one is just a gather.
"""

from __future__ import annotations

import torch


class ScaleKVCache:
    def __init__(self, num_layers: int, budget: int = 0, drafters: int = 1):
        if budget < 0:
            raise ValueError(f"kv_budget must be >= 0 (0 keeps everything), got {budget}")
        if not 0 <= drafters <= num_layers:
            raise ValueError(f"kv_drafters must be in 0..{num_layers}, got {drafters}")
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # Each layer's AdaLN gains/shifts/gates (B, 1, 6, D): they depend on the class alone, so one decode computes
        # them once. A cache rebuilt from others (batching rows) starts without them and recomputes them.
        self.modulation: list[torch.Tensor | None] = [None] * num_layers
        self.budget, self.num_drafters = budget, drafters
        self.drafters: set[int] | None = None  # chosen at the first compression
        self._scores: dict[int, torch.Tensor] = {}
        self._spread: dict[int, float] = {}
        self.peak = 0  # most entries held at once, summed over layers (per batch row)

    def wants_scores(self, layer: int) -> bool:
        """Whether the layer's attention must be observed: it holds more than its budget and is not a drafter
        (before the first compression every layer is observed, to choose the drafters)."""
        keys = self.keys[layer]
        over = self.budget > 0 and keys is not None and keys.shape[2] > self.budget
        return over and (self.drafters is None or layer not in self.drafters)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, ...]:
        """Append k, v (B, H, T, hd) to the layer's entries; return all of them. `start` (the raster cache's
        write position) is not needed: entries are not tied to positions."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        self.peak = max(self.peak, self.size())
        return self.keys[layer], self.values[layer]

    def size(self) -> int:
        """Entries held, summed over layers."""
        return sum(k.shape[2] for k in self.keys if k is not None)

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        """Record how much the newest queries q (B, H, T, hd) attend to each entry k (B, H, S, hd)."""
        attn = (q.float() @ k.float().transpose(-2, -1) * scale).softmax(-1)  # (B, H, T, S)
        self._scores[layer] = attn.sum((1, 2))  # (B, S)
        # Spread of the layer's attention: entropy of the average attention row, as a fraction of its maximum.
        mean = attn.mean((0, 1, 2)).clamp(min=1e-12)
        self._spread[layer] = float(-(mean * mean.log()).sum() / max(torch.log(torch.tensor(k.shape[2])), 1e-6))

    def compress(self) -> None:
        """After a scale: every refiner layer over budget keeps its `budget` most-attended entries."""
        if not self._scores:
            return
        if self.drafters is None:
            ranked = sorted(self._spread, key=self._spread.get, reverse=True)
            self.drafters = set(ranked[: self.num_drafters])
        for layer, score in self._scores.items():
            keys = self.keys[layer]
            if layer in self.drafters or keys.shape[2] <= self.budget:
                continue
            keep = score.topk(self.budget, dim=-1).indices.sort(-1).values  # (B, budget), original order
            index = keep[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            self.keys[layer] = keys.gather(2, index)
            self.values[layer] = self.values[layer].gather(2, index)
        self._scores.clear()
        self._spread.clear()
