"""Pre-tokenized data: tokens on disk as memory-mapped `.npy` shards, so generator training never runs
the tokenizer.

Tokens are what the tokenizer's `values` say: ids of a VQ tokenizer ("discrete", (n, L) uint16/int32), or the
latents of a KL tokenizer ("continuous", (n, L, D) float16: its posterior means, in its own scale). For latents,
`meta.json` also stores the scale factor measured on them (one over their std, as MAR/LDM scale latents to unit
variance), and reading applies it: a continuous order trains on unit-scale latents.

Folder layout: `meta.json` (values, vocab size, sequence length, token dim, scale factor, class names, shard list)
and, per shard, `tokens-NNNNN.npy` (n, L) or (n, L, D) and `labels-NNNNN.npy` (n,).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from argen.errors import ConfigError
from argen.pretrained import atomic_write
from argen.train.distributed import DistInfo, gather_in_order, rank_batches

META_NAME = "meta.json"


def token_values(tokenizer: torch.nn.Module) -> str:
    """Whether the tokenizer gives "discrete" ids (VQ tokenizers) or "continuous" vectors (the KL tokenizer)."""
    return getattr(tokenizer, "values", "discrete")


def _dtype_for(tokenizer: torch.nn.Module) -> np.dtype:
    if token_values(tokenizer) == "continuous":
        return np.dtype(np.float16)
    return np.dtype(np.uint16) if tokenizer.vocab_size <= 65536 else np.dtype(np.int32)


def _encode(tokenizer: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What a shard stores for a batch: ids (B, L), or unscaled latent tokens (B, L, D)."""
    if token_values(tokenizer) == "continuous":
        return tokenizer.unscaled_tokens(images).float()
    return tokenizer.encode(images)


def _normalisation(parts: list[np.ndarray], per_channel: bool = False) -> dict:
    """What makes the latents unit-scale: {"scale_factor": one over the std of every latent value}, or with
    `per_channel` each channel's own mean and std ({"scale_factor": [1 / std_c], "latent_shift": [mean_c]}), so each
    channel is standardised (a diffusion head's noise is unit normal in every channel). float64 sums over all shards'
    float16 values."""
    axes = tuple(range(parts[0].ndim - 1)) if per_channel else None
    n = sum(p.size for p in parts) // (parts[0].shape[-1] if per_channel else 1)
    total = sum(p.astype(np.float64).sum(axis=axes) for p in parts)
    squares = sum(np.square(p.astype(np.float64)).sum(axis=axes) for p in parts)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    if not np.all(std > 0):
        raise ValueError("the tokenizer's latents are constant (std 0): no scale factor; is the tokenizer trained?")
    if per_channel:
        return {"scale_factor": (1.0 / std).tolist(), "latent_shift": mean.tolist()}
    return {"scale_factor": float(1.0 / std)}


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


@torch.no_grad()
def write_shards(
    tokenizer: torch.nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    batch_size: int = 256,
    shard_size: int = 100_000,
    hflip: bool = False,
    dist_info: DistInfo | None = None,
    per_channel: bool = False,
) -> Path:
    """Encode every image of `dataset` with `tokenizer` (and optionally its mirror image, as more data).

    A shard is closed once it holds `shard_size` rows, at a batch boundary. Under torchrun (`dist_info` with several
    ranks) the batches of each shard are dealt out to the ranks and rank 0 writes the shard: the files are those
    one process writes. Latents (a KL tokenizer's) are stored in the posterior's own scale with what makes them
    unit-scale when read: one scale factor, or with `per_channel` a shift and a scale per channel.
    """
    info = dist_info or DistInfo()
    out_dir = Path(out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    dtype = _dtype_for(tokenizer)
    views = 2 if hflip else 1
    per_shard = batch_size * -(-shard_size // (batch_size * views))  # images per shard: whole batches
    shards = []
    bar = tqdm(total=-(-len(dataset) // batch_size), desc="tokenizing", unit="batch", disable=not info.is_main)
    for first in range(0, len(dataset), per_shard):
        batches = rank_batches(range(first, min(first + per_shard, len(dataset))), batch_size, info)
        encoded = []
        for images, y in DataLoader(dataset, batch_sampler=[list(b) for b in batches]):
            encoded.append(
                [
                    (_encode(tokenizer, v.to(device)).cpu().numpy().astype(dtype), y.numpy().astype(np.int64))
                    for v in ([images, images.flip(-1)] if hflip else [images])
                ]
            )
            bar.update(min(info.world_size, bar.total - bar.n))  # rank 0's estimate of all ranks' progress
        gathered = gather_in_order(encoded, info)  # per batch in batch order: (tokens, labels) per view
        if gathered is None:
            continue
        parts = [view for batch in gathered for view in batch]
        i = len(shards)
        tokens, labels = np.concatenate([t for t, _ in parts]), np.concatenate([lab for _, lab in parts])
        _save_npy(out_dir / f"tokens-{i:05d}.npy", tokens)
        _save_npy(out_dir / f"labels-{i:05d}.npy", labels)
        shards.append({"tokens": f"tokens-{i:05d}.npy", "labels": f"labels-{i:05d}.npy", "count": len(labels)})
    bar.close()
    if info.is_main:
        meta = {
            "values": token_values(tokenizer),
            "vocab_size": tokenizer.vocab_size,
            "seq_len": int(tokenizer.seq_len),
            "class_names": list(getattr(dataset, "class_names", [])),
            "shards": shards,
        }
        if meta["values"] == "continuous":
            stored = [np.load(out_dir / s["tokens"], mmap_mode="r") for s in shards]
            meta.update(token_dim=int(tokenizer.token_dim), **_normalisation(stored, per_channel))
        atomic_write(out_dir / META_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return out_dir


class TokenShards(Dataset):
    """Memory-mapped token shards; item i is (tokens, label () int64): tokens (L,) int64 ids, or (L, D) float32
    latents times the shards' scale factor."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: write shards with `argen tokenize` first")
        self.meta = json.loads(meta_path.read_text())
        self.vocab_size, self.seq_len = self.meta["vocab_size"], self.meta["seq_len"]
        self.values = self.meta.get("values", "discrete")  # shards written before latents hold ids
        self.token_dim = self.meta.get("token_dim")  # continuous: values per token
        # continuous: (latent - latent_shift) * scale_factor when read, one number or one per channel
        self.scale_factor = self.meta.get("scale_factor", 1.0)
        self.latent_shift = self.meta.get("latent_shift")
        self._scale = np.asarray(self.scale_factor, dtype=np.float32)
        self._shift = np.asarray(self.latent_shift or 0.0, dtype=np.float32)
        self.class_names = self.meta.get("class_names", [])
        self.tokens = [np.load(self.directory / s["tokens"], mmap_mode="r") for s in self.meta["shards"]]
        self.labels = [np.load(self.directory / s["labels"], mmap_mode="r") for s in self.meta["shards"]]
        row = (self.seq_len,) if self.values == "discrete" else (self.seq_len, self.token_dim)
        for s, t in zip(self.meta["shards"], self.tokens, strict=True):
            if t.shape != (s["count"], *row):
                raise ValueError(f"{s['tokens']}: shape {t.shape}, expected {(s['count'], *row)}")
        self.offsets = np.cumsum([0] + [len(t) for t in self.tokens])

    def check_order(self, order) -> None:
        """ConfigError unless these shards hold the kind of values the order (a model's `OrderSpec`) models."""
        if self.values != order.values:
            kind = "a VQ tokenizer (ids)" if order.values == "discrete" else "a KL tokenizer (latents)"
            raise ConfigError(
                f"{self.directory} holds {self.values} tokens, but the {order.name} order models {order.values} "
                f"ones: tokenize the data with {kind}, or choose a preset of a {self.values} order"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - self.offsets[s]
        label = torch.tensor(int(self.labels[s][j]))
        if self.values == "continuous":
            return torch.from_numpy((self.tokens[s][j].astype(np.float32) - self._shift) * self._scale), label
        return torch.from_numpy(self.tokens[s][j].astype(np.int64)), label
