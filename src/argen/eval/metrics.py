"""Sample-quality metrics on feature tensors (N, D): Fréchet distance, KID, precision/recall, the share of
near-copies of training images, and the Inception-Score-style exp(E KL(p(y|x) || p(y))) on class probabilities.

Everything is computed in float64 on the CPU from features of any extractor, so the same code serves the
offline MNIST classifier and, when its weights are available, Inception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _check(features: torch.Tensor, name: str) -> torch.Tensor:
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) with N >= 2, got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains non-finite values")
    return features.detach().double().cpu()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^1/2) between Gaussians fitted to the two feature sets."""
    real, fake = _check(real, "real"), _check(fake, "fake")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    # tr((S_r S_f)^1/2) = sum of sqrt eigenvalues of the symmetric PSD matrix S_r^1/2 S_f S_r^1/2.
    evals, evecs = torch.linalg.eigh(cov_r)
    sqrt_r = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(sqrt_r @ cov_f @ sqrt_r).clamp(min=0).sqrt().sum()
    value = (mu_r - mu_f).pow(2).sum() + cov_r.trace() + cov_f.trace() - 2 * middle
    return max(float(value), 0.0)


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


@dataclass
class KID:
    mean: float
    std: float


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KID:
    """Unbiased MMD^2 with the cubic polynomial kernel (Bińkowski et al. 2018), averaged over random subsets."""
    real, fake = _check(real, "real"), _check(fake, "fake")
    m = min(subset_size, len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]]
        y = fake[torch.randperm(len(fake), generator=g)[:m]]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off = m * (m - 1)
        values.append(
            ((kxx.sum() - kxx.diag().sum()) / off + (kyy.sum() - kyy.diag().sum()) / off - 2 * kxy.mean()).item()
        )
    t = torch.tensor(values)
    return KID(t.mean().item(), t.std().item() if len(values) > 1 else 0.0)


@dataclass
class PrecisionRecall:
    precision: float
    recall: float


# Rows of the distance matrix held at once: memory is O(N * chunk), never (N, N) (20 GB in float64 at N = 50,000).
PR_CHUNK = 512


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance from each point of x (N, D) to its k-th nearest other point, a (chunk, N) block at a time."""
    radii = [torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)]
    return torch.cat(radii)  # k + 1: the point itself is at distance 0


def _coverage(points: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Share of points (M, D) inside some ball (support (N, D), radii (N,)), a (chunk, N) block at a time."""
    inside = []
    for i in range(0, len(points), chunk):
        inside.append((torch.cdist(points[i : i + chunk], support) <= radii[None]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = PR_CHUNK) -> PrecisionRecall:
    """Kynkäänniemi et al. 2019: each set's manifold is the union of balls reaching its k-th nearest neighbour;
    precision = share of fakes inside the real manifold, recall = share of reals inside the fake manifold.

    real (N, D), fake (M, D); distances are computed `chunk` rows at a time (memory O(max(N, M) * chunk)).
    """
    real, fake = _check(real, "real"), _check(fake, "fake")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    precision = _coverage(fake, real, _kth_neighbour_radius(real, k, chunk), chunk)
    recall = _coverage(real, fake, _kth_neighbour_radius(fake, k, chunk), chunk)
    return PrecisionRecall(precision, recall)


def _nearest_distance(points: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    """(M,) distance from each point (M, D) to its nearest neighbour in bank (N, D), a (chunk, N) block at a time."""
    return torch.cat(
        [torch.cdist(points[i : i + chunk], bank).min(dim=1).values for i in range(0, len(points), chunk)]
    )


# The share of held-out real images that count as near-copies, by the threshold's construction.
NEAR_COPY_QUANTILE = 0.05


@dataclass
class NearCopyCheck:
    """Share of fakes closer to their nearest training image than all but 5 % of held-out real images are.

    FD against a floor of training images cannot tell a model that copies its training set from one that
    generalises (a copier scores at the floor), so this is reported beside it: 5 % for images the model never
    saw, near 100 % for exact copies, ~80 % for a tokenizer's reconstructions of training images (docs/quality.md).
    Fitted once (`fit`: the training features and the held-out threshold), then applied to each seed's samples.
    """

    train: torch.Tensor  # (N, D) features of the generator's training images, float64 on the CPU
    threshold: float  # held-out real images' 5th-percentile distance to their nearest training image

    @classmethod
    def fit(cls, train: torch.Tensor, held_out: torch.Tensor, chunk: int = PR_CHUNK) -> NearCopyCheck:
        train, held_out = _check(train, "train"), _check(held_out, "held_out")
        return cls(train, _nearest_distance(held_out, train, chunk).quantile(NEAR_COPY_QUANTILE).item())

    def share(self, fake: torch.Tensor, chunk: int = PR_CHUNK) -> float:
        fake = _check(fake, "fake")
        if fake.shape[1] != self.train.shape[1]:
            raise ValueError(f"fake has {fake.shape[1]} features per image, the training set {self.train.shape[1]}")
        return (_nearest_distance(fake, self.train, chunk) < self.threshold).double().mean().item()


def classifier_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from (N, K) class probabilities: the Inception Score's formula."""
    p = _check(probs, "probs")
    marginal = p.mean(0, keepdim=True)
    kl = (p * (p.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
    return math.exp(kl.mean().item())
