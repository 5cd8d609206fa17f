import math

import pytest
import torch

from argen.data.datasets import ArrayDataset, load_dataset
from argen.data.images import to_uint8
from argen.eval.evaluate import evaluate, features_of, reconstruction_fd, reference_sets, reference_split
from argen.eval.features import DEFAULT_CLASSIFIER, ClassifierFeatures
from argen.eval.metrics import NearCopyCheck
from argen.eval.speed import bench_sampling
from argen.pipeline import ARPipeline
from argen.pretrained import load_pretrained


@pytest.fixture(scope="module")
def setup():
    pipe = ARPipeline.from_pretrained("default")
    reference, rest = reference_sets("mnist", 200, 28, 1)
    return pipe, reference, rest, ClassifierFeatures(load_pretrained(DEFAULT_CLASSIFIER))


def test_reference_comes_from_the_held_out_test_split(setup):
    _, reference, rest, _ = setup
    assert len(reference) == 200 and len(rest) == 4000
    assert torch.bincount(reference.labels).tolist() == [20] * 10
    test = ArrayDataset.of(load_dataset("mnist:test", 28))
    flat = test.images.flatten(1)
    # every reference image is a test image, and no training-split image is
    assert all((flat == img.flatten()).all(1).any() for img in reference.images[:20])
    assert not any((flat == img.flatten()).all(1).any() for img in rest.images[:200])
    again, _ = reference_sets("mnist", 200, 28, 1)
    assert torch.equal(again.images, reference.images)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        reference_split(test, 205)
    with pytest.raises(ValueError, match="only 100"):
        reference_split(test, 2000)


def test_evaluate_the_shipped_model(setup):
    pipe, reference, rest, features = setup
    report = evaluate(pipe, reference, rest, features, seeds=[0, 1], classifier=features)
    assert report.num_samples == 200 and len(report.fd.values) == 2
    assert report.class_accuracy.mean > 0.8
    assert report.fd_real_floor > 0 and report.fd.mean > 0
    assert 0 <= report.precision.mean <= 1 and 0 <= report.recall.mean <= 1
    assert 0 < report.bits_per_token < math.log2(pipe.generator.vocab_size)
    assert report.bits_per_scale is None  # one token map
    assert 5 < report.classifier_score.mean <= 10  # confident and diverse over 10 classes
    assert report.near_copies.mean < 0.15  # it draws new digits (a copier: ~80 %, below)
    assert "near-copies of training images" in dict(report.rows())
    # Unguided sampling with a flattened distribution is worse by every measure the suite has.
    hot = evaluate(pipe, reference, rest, features, seeds=[0], classifier=features, cfg_scale=1.0, temperature=1.5)
    assert hot.fd.mean > report.fd.mean and hot.class_accuracy.mean < report.class_accuracy.mean


@torch.no_grad()
def test_near_copies_tell_a_model_that_copies_its_training_digits_from_one_that_does_not(setup):
    """A generator that reproduced its training digits through its tokenizer would score at the FD floor;
    the near-copy share tells it apart: the tokenizer's reconstructions of training vs held-out digits."""
    pipe, reference, rest, features = setup
    check = NearCopyCheck.fit(
        features_of(features, to_uint8(rest.images)), features_of(features, to_uint8(reference.images))
    )

    def reconstructed(images):
        return features_of(features, to_uint8(pipe.tokenizer.decode(pipe.tokenizer.encode(images)).clamp(-1, 1)))

    assert check.share(reconstructed(rest.images[:200])) > 0.5
    assert check.share(reconstructed(reference.images)) < 0.15


def test_a_next_scale_model_reports_held_out_bits_per_scale(setup):
    """What showed that the shipped next-scale generator memorised its finest map (docs/quality.md)."""
    _, reference, rest, features = setup
    pipe = ARPipeline.from_pretrained("next-scale")
    report = evaluate(pipe, reference, rest, features, seeds=[0], classifier=features)
    assert [pn for pn, _ in report.bits_per_scale] == list(pipe.tokenizer.scales)
    tokens = sum(pn * pn for pn in pipe.tokenizer.scales)
    weighted = sum(pn * pn * bits for pn, bits in report.bits_per_scale) / tokens
    assert weighted == pytest.approx(report.bits_per_token, rel=1e-4)  # the per-scale figures make up the mean
    by_scale = dict(report.bits_per_scale)
    assert by_scale[7] > 5 > by_scale[2]  # the finest map costs the most bits per token held out
    assert dict(report.rows())["test NLL per scale (bits/token)"].startswith("1x1: ")


def test_reconstruction_fd_is_the_tokenizer_anchor(setup):
    pipe, reference, rest, features = setup
    fd, floor = reconstruction_fd(pipe.tokenizer, reference, rest, features)
    report = evaluate(pipe, reference, rest, features, seeds=[0], classifier=features)
    assert floor == pytest.approx(report.fd_real_floor)  # the same real images and reference as `evaluate`
    # The shipped VQ reconstructs held-out digits close to the floor (its generator's samples now score as close at
    # this N, so the two are not ordered here).
    assert floor * 0.9 < fd < floor * 1.3

    class Blur(torch.nn.Module):  # a "tokenizer" that loses the strokes' detail: 4x4 average pooling
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def encode(self, x):
            return torch.nn.functional.avg_pool2d(x, 4)

        def decode(self, z):
            return torch.nn.functional.interpolate(z, scale_factor=4, mode="nearest")

    blurred, _ = reconstruction_fd(Blur(), reference, rest, features)
    assert blurred > 2 * fd


def test_features_are_torchmetrics_compatible(setup):
    *_, features = setup
    rgb = torch.randint(0, 256, (3, 3, 299, 299), dtype=torch.uint8)  # what torchmetrics probes with
    assert features(rgb).shape == (3, features.num_features)
    with pytest.raises(ValueError, match="uint8"):
        features(torch.zeros(1, 1, 28, 28))


def test_bench_counts_forward_passes_and_flops(setup):
    pipe = setup[0]
    results = bench_sampling(
        {"plain": (pipe, {"cfg_scale": 1.0}), "cfg": (pipe, {"cfg_scale": 3.0})}, [2], repeats=1, peak=1e10
    )
    plain, cfg = results
    assert plain.nfe == cfg.nfe == pipe.generator.seq_len  # raster: one pass per token
    assert cfg.flops_per_image > 1.5 * plain.flops_per_image  # guidance doubles the generator's batch
    assert plain.seconds_per_image > 0 and plain.peak_ratio > 0


def test_bench_holds_each_run_to_the_peak_of_its_own_dtype(setup, monkeypatch):
    import argen.eval.speed as speed

    measured = []

    def fake_peak(n=1024, repeats=10, device="cpu", dtype=torch.float32):
        measured.append(dtype)
        return 1e10 if dtype == torch.float32 else 2e10

    monkeypatch.setattr(speed, "matmul_peak_flops", fake_peak)
    fp32 = setup[0]
    bf16 = ARPipeline.from_pretrained("default", torch_dtype=torch.bfloat16)
    a, b = bench_sampling({"fp32": (fp32, {}), "bf16": (bf16, {})}, [1], repeats=1)
    assert sorted(measured, key=str) == [torch.bfloat16, torch.float32]  # once per dtype
    # the same FLOPs (the count does not depend on the dtype); the share is of that dtype's own peak
    assert a.peak_ratio == pytest.approx(a.flops_per_image / a.seconds_per_image / 1e10)
    assert b.peak_ratio == pytest.approx(b.flops_per_image / b.seconds_per_image / 2e10)
