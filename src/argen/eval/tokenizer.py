"""Tokenizer quality: reconstruction error and how much of the codebook the data actually uses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class TokenizerReport:
    num_images: int
    mse: float  # on pixels in [0, 1]
    psnr: float  # dB, peak 1
    codebook_usage: float  # fraction of codes used at least once
    codebook_perplexity: float  # exp(entropy of the code histogram); V when uniform


def psnr_from_mse(mse: float) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: torch.nn.Module, dataset: Dataset, batch_size: int = 250) -> TokenizerReport:
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    sq_err, pixels, n = 0.0, 0, 0
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        images = images.to(device)
        ids = tokenizer.encode(images)
        recon = tokenizer.decode(ids).clamp(-1, 1)
        # Errors on the [0, 1] scale, the usual convention for PSNR.
        sq_err += ((recon - images) / 2).pow(2).sum().item()
        pixels += images.numel()
        n += images.shape[0]
        counts += torch.bincount(ids.flatten().cpu(), minlength=tokenizer.vocab_size)
    p = counts.double() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    mse = sq_err / pixels
    return TokenizerReport(n, mse, psnr_from_mse(mse), (counts > 0).float().mean().item(), math.exp(entropy))
