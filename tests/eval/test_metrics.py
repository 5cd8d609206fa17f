import math
import subprocess
import sys

import pytest
import torch

from argen.eval.metrics import (
    NearCopyCheck,
    classifier_score,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)


def gaussian(n, d=8, shift=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = gaussian(2000)
    assert frechet_distance(x, x) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    # Two large samples of N(0, I) and N(1, 4 I) in d=8: FD = 8 * 1 + 8 * (1 + 4 - 2 * 2) = 16.
    fd = frechet_distance(gaussian(20000, seed=1), gaussian(20000, shift=1.0, scale=2.0, seed=2))
    assert abs(fd - 16.0) < 0.5


def test_frechet_distance_grows_with_noise():
    real = gaussian(3000, seed=3)
    fds = [frechet_distance(real, real + gaussian(3000, scale=s, seed=4)) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(fds, fds[1:], strict=False))


def test_kid_is_unbiased_on_equal_distributions_and_positive_otherwise():
    same = kernel_inception_distance(gaussian(1000, seed=5), gaussian(1000, seed=6), num_subsets=50, subset_size=200)
    assert abs(same.mean) < 2 * same.std / math.sqrt(50) + 1e-4  # centred on zero (can be negative)
    other = kernel_inception_distance(
        gaussian(1000, seed=5), gaussian(1000, shift=0.5, seed=6), num_subsets=20, subset_size=200
    )
    assert other.mean > 10 * same.std


def test_precision_recall_on_known_overlaps():
    real = gaussian(1000, d=2, seed=7)
    same = precision_recall(real, gaussian(1000, d=2, seed=8))
    assert same.precision > 0.9 and same.recall > 0.9
    far = precision_recall(real, gaussian(1000, d=2, shift=50.0, seed=9))
    assert far.precision == 0.0 and far.recall == 0.0
    half = torch.cat([gaussian(500, d=2, seed=10), gaussian(500, d=2, shift=50.0, seed=11)])
    mixed = precision_recall(real, half)
    assert abs(mixed.precision - 0.5) < 0.05 and mixed.recall > 0.85


def test_classifier_score_extremes():
    k = 10
    confident_and_diverse = torch.eye(k).repeat(10, 1)
    assert abs(classifier_score(confident_and_diverse) - k) < 1e-6
    uniform = torch.full((100, k), 1.0 / k)
    assert abs(classifier_score(uniform) - 1.0) < 1e-9


def dense_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """The textbook computation with full (N, N) and (M, N) distance matrices, to check the chunked one."""
    real, fake = real.double(), fake.double()
    r_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    r_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    precision = (torch.cdist(fake, real) <= r_real[None]).any(1).double().mean().item()
    recall = (torch.cdist(real, fake) <= r_fake[None]).any(1).double().mean().item()
    return precision, recall


def test_chunked_precision_recall_equals_the_dense_matrices():
    real, fake = gaussian(700, d=16, seed=12), gaussian(500, d=16, shift=0.3, seed=13)
    expected = dense_precision_recall(real, fake)
    assert 0.2 < expected[0] < 0.95 and 0.2 < expected[1] < 0.95  # a case where the boundary matters
    for chunk in (1, 7, 256, 500, 10_000):
        got = precision_recall(real, fake, chunk=chunk)
        assert (got.precision, got.recall) == expected, f"chunk {chunk}"


PEAK_MEMORY_SCRIPT = """
import resource, torch
from argen.eval.metrics import precision_recall
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
real, fake = torch.randn(9000, 8, generator=g).double(), torch.randn(9000, 8, generator=g).double()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
precision_recall(real, fake)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_precision_recall_never_holds_an_n_by_n_matrix():
    # N = 9,000: one dense float64 distance matrix is 648 MB; the chunked computation holds (512, N) blocks (37 MB).
    out = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    grown = int(out.stdout.split()[-1])
    assert grown < 200e6, f"peak memory grew by {grown / 1e6:.0f} MB during precision/recall at N = 9,000"


def test_near_copy_share_is_five_percent_for_unseen_points_and_all_for_copies():
    train, held_out = gaussian(3000, seed=20), gaussian(1000, seed=21)
    check = NearCopyCheck.fit(train, held_out)
    unseen = check.share(gaussian(2000, seed=22))
    assert 0.02 < unseen < 0.09  # the threshold is held-out's 5th percentile: unseen draws land near 5 %
    assert check.share(train[:500]) == 1.0
    assert check.share(train[:500] + gaussian(500, scale=0.01, seed=23)) == 1.0
    assert check.share(gaussian(500, shift=3.0, seed=24)) == 0.0  # far from everything
    with pytest.raises(ValueError, match="4 features per image, the training set 8"):
        check.share(gaussian(10, d=4))
