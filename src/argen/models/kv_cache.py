"""An explicit key/value cache: one buffer per layer, filled position by position, grown in blocks."""

from __future__ import annotations

import torch

# The buffers grow by this many positions at a time (up to max_len). A pass that attends over a layer's whole
# buffer hands the batched matmul one dense block; over a slice of a longer buffer, PyTorch's CPU bf16 bmm copies
# the slice first (GPT-B, 128 of 256 keys: 0.76 ms sliced against 0.36 ms dense for the score product).
KV_BLOCK = 32


class KVCache:
    """Keys and values of every layer for a batch, (B, H, capacity, hd) each, capacity growing in blocks of
    `KV_BLOCK` positions up to max_len as positions are written.

    A query attends to the entries of its row up to its own position; entries after it (a rejected speculative
    draft's) are simply rewritten by the next pass.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, max_len: int, like: torch.Tensor):
        shape = (batch, num_heads, 0, head_dim)
        self.keys = [like.new_zeros(shape) for _ in range(num_layers)]
        self.values = [like.new_zeros(shape) for _ in range(num_layers)]
        self.max_len = max_len
        # Which positions of each row hold entries: orders that fill the cache out of order (parallel decoding)
        # mask the holes with it.
        self.written = torch.zeros(batch, max_len, dtype=torch.bool, device=like.device)

    @classmethod
    def _holding(cls, keys: list[torch.Tensor], values: list[torch.Tensor], written: torch.Tensor) -> KVCache:
        """A cache over existing entries: every field is set here, so a new field is handled in one place."""
        out = cls.__new__(cls)
        out.keys, out.values, out.written = keys, values, written
        out.max_len = written.shape[1]
        return out

    @classmethod
    def cat(cls, caches: list[KVCache]) -> KVCache:
        """The rows of several caches of one model, in order, as one cache (a server's batch of requests)."""

        def cat(layer: tuple[torch.Tensor, ...]) -> torch.Tensor:
            capacity = max(t.shape[2] for t in layer)
            return torch.cat([_grown(t, capacity) for t in layer])

        return cls._holding(
            [cat(layer) for layer in zip(*(c.keys for c in caches), strict=True)],
            [cat(layer) for layer in zip(*(c.values for c in caches), strict=True)],
            torch.cat([c.written for c in caches]),
        )

    def block_length(self, n: int) -> int:
        """n positions rounded up to the cache's blocks (at most max_len): the length a pass over the first n
        positions attends over to read whole buffers."""
        return min(self.max_len, -(-n // KV_BLOCK) * KV_BLOCK)

    def _reserve(self, layer: int, n: int) -> None:
        if n > self.keys[layer].shape[2]:
            capacity = self.block_length(n)
            self.keys[layer] = _grown(self.keys[layer], capacity)
            self.values[layer] = _grown(self.values[layer], capacity)

    def take(self, rows: torch.Tensor) -> KVCache:
        """The cache of some rows (n,) (a request leaving a server's batch)."""
        return self._holding([k[rows] for k in self.keys], [v[rows] for v in self.values], self.written[rows])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, hd) at positions start..start+T; return all entries up to there."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self._reserve(layer, end)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def update_rows(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, hd) of row b at its own positions (B, T); return all entries up to `length`, by
        default the largest position (each row masks what is not valid for it). A fixed length (the whole
        cache) makes a row's attention independent of how far its neighbours have got."""
        low, high = (int(p) for p in positions.aminmax())
        if high >= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing at {high}")
        end = max(high + 1, length or 0)
        self._reserve(layer, end)
        if low == high and positions.shape[1] == 1:  # every row at the same position (plain decoding): a slice
            self.keys[layer][:, :, low : low + 1] = k
            self.values[layer][:, :, low : low + 1] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.keys[layer][rows, :, positions] = k.transpose(1, 2)  # indexed view: (B, T, H, hd)
            self.values[layer][rows, :, positions] = v.transpose(1, 2)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def _grown(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """t (B, H, n, hd) with zeros after its n positions up to `capacity`."""
    if t.shape[2] >= capacity:
        return t
    out = t.new_zeros(*t.shape[:2], capacity, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out
