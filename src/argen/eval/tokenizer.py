"""Tokenizer quality: reconstruction error, and how the tokens are spread — codebook usage for a VQ tokenizer,
latent statistics for a KL one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from argen.data.shards import token_values


@dataclass
class TokenizerReport:
    num_images: int
    mse: float  # on pixels in [0, 1]
    psnr: float  # dB, peak 1
    codebook_usage: float  # fraction of codes used at least once
    codebook_perplexity: float  # exp(entropy of the code histogram); V when uniform
    # A multi-scale tokenizer: (pn, perplexity of that map's codes) per scale. One shared codebook can look well
    # used while its coarse maps have collapsed to a few codes (the next-scale generator then has little to model).
    scale_perplexity: list[tuple[int, float]] | None = None


@dataclass
class LatentReport:
    """A KL tokenizer: reconstruction of the posterior mean, and the posterior means' statistics (own scale)."""

    num_images: int
    mse: float  # on pixels in [0, 1]
    psnr: float  # dB, peak 1
    channel_mean: list[float]  # per latent channel, over images and positions
    channel_std: list[float]
    std: float  # over every latent value: `argen tokenize` scales latents by 1 / std
    kl: float  # KL(q || N(0, I)) per image, summed over latent values, averaged over images


def psnr_from_mse(mse: float) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: torch.nn.Module, dataset: Dataset, batch_size: int = 250
) -> TokenizerReport | LatentReport:
    if token_values(tokenizer) == "continuous":
        return _evaluate_latents(tokenizer, dataset, batch_size)
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    scales = getattr(tokenizer, "scales", None)  # a multi-scale tokenizer: each token map counted apart
    counts = torch.zeros(len(scales) if scales else 1, tokenizer.vocab_size, dtype=torch.long)
    sq_err, pixels, n = 0.0, 0, 0
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        images = images.to(device)
        ids = tokenizer.encode(images)
        recon = tokenizer.decode(ids).clamp(-1, 1)
        sq_err += _squared_error(recon, images)
        pixels += images.numel()
        n += images.shape[0]
        maps = tokenizer.split(ids) if scales else [ids]
        for si, m in enumerate(maps):
            counts[si] += torch.bincount(m.flatten().cpu(), minlength=tokenizer.vocab_size)
    mse = sq_err / pixels
    total = counts.sum(0)
    per_scale = [(pn, _perplexity(c)) for pn, c in zip(scales, counts, strict=True)] if scales else None
    return TokenizerReport(
        n, mse, psnr_from_mse(mse), (total > 0).float().mean().item(), _perplexity(total), per_scale
    )


def _perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a histogram."""
    p = counts.double() / counts.sum()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


def _squared_error(recon: torch.Tensor, images: torch.Tensor) -> float:
    """Summed squared error on the [0, 1] scale, the usual convention for PSNR."""
    return ((recon - images) / 2).double().pow(2).sum().item()


def _evaluate_latents(tokenizer: torch.nn.Module, dataset: Dataset, batch_size: int) -> LatentReport:
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    D = tokenizer.config.embed_dim
    sums, squares, kl = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), 0.0
    sq_err, pixels, n, values = 0.0, 0, 0, 0
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        images = images.to(device)
        posterior = tokenizer.posterior(images)
        recon = tokenizer.decode_unscaled(posterior.mean).clamp(-1, 1)
        sq_err += _squared_error(recon, images)
        pixels += images.numel()
        n += images.shape[0]
        mean = posterior.mean.double().transpose(0, 1).reshape(D, -1).cpu()  # (D, B h w)
        sums += mean.sum(dim=1)
        squares += mean.pow(2).sum(dim=1)
        values += mean.shape[1]
        kl += posterior.kl().double().sum().item()
    channel_mean = sums / values
    channel_std = (squares / values - channel_mean.pow(2)).clamp(min=0).sqrt()
    std = math.sqrt(max(squares.sum().item() / (values * D) - (sums.sum().item() / (values * D)) ** 2, 0.0))
    mse = sq_err / pixels
    return LatentReport(n, mse, psnr_from_mse(mse), channel_mean.tolist(), channel_std.tolist(), std, kl / n)
