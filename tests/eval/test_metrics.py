import math

import torch

from argen.eval.metrics import classifier_score, frechet_distance, kernel_inception_distance, precision_recall


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
